"""The prepare stage on a folder of the user's own images: formats, modes, layouts, splits, the
incremental re-decode, and one clear line for each kind of bad data."""

import hashlib
import io
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnpipe import PipelineError
from cnnpipe.data.images import decode
from cnnpipe.data.loader import split_rows
from cnnpipe.data.preparation import prepare
from cnnpipe.data.prepared import IMAGES, MANIFEST, Prepared, unit_hash
from cnnpipe.training import build
from cnnpipe.training.models import ChapterCNN, DenseBaseline
from tests.helpers import folder_config, keras_chapter_params, make_image_folder

CLASSES = ["bolt", "nut", "washer"]


def run_prepare(source: Path, dest: Path, *overrides: str) -> Prepared:
    prepare(folder_config(source, *overrides).data, dest)
    return Prepared.open(dest)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize("classes", [2, 3, 10])
def test_classes_are_the_sorted_folder_names_and_pixels_are_decoded_once(tmp_path, classes):
    names = [f"class_{k:02d}" for k in reversed(range(classes))]
    written = make_image_folder(tmp_path / "src", names, per_class=4, size=(32, 32))
    prepared = run_prepare(tmp_path / "src", tmp_path / "out")
    assert prepared.manifest.classes == sorted(names)
    assert prepared.manifest.name == "src"
    for row, f in enumerate(prepared.manifest.files):
        assert np.array_equal(prepared.images.array[row], written[f["path"]])
        assert prepared.manifest.classes[prepared.labels[row]] == f["path"].split("/")[0]
        data = (tmp_path / "src" / f["path"]).read_bytes()
        assert f["sha256"] == hashlib.sha256(data).hexdigest()[:16]
    assert len(prepared.labels) == 4 * classes


def test_every_format_and_mode_becomes_rgb_at_the_configured_size(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    gray16 = Image.fromarray(rng.integers(0, 65535, (30, 50), dtype=np.uint16))
    files = {
        "a/photo.jpg": encoded(rgb, "JPEG"),
        "a/shot.webp": encoded(rgb, "WEBP", lossless=True),
        "a/scan.bmp": encoded(rgb.convert("L"), "BMP"),
        "a/scan.tif": encoded(gray16, "TIFF"),
        "b/logo.png": encoded(rgb.convert("RGBA"), "PNG"),
        "b/icon.gif": encoded(rgb.convert("P"), "GIF"),
        "b/print.jpg": encoded(rgb.convert("CMYK"), "JPEG"),
        "b/sub/deeper.png": encoded(rgb.convert("P"), "PNG"),
    }
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    # Skipped without a word: hidden files, files that are not images, hidden folders.
    (src / "a" / ".DS_Store").write_bytes(b"\0\1")
    (src / "a" / "README.txt").write_text("notes")
    (src / "b" / ".thumbnails").mkdir()
    (src / "b" / ".thumbnails" / "x.png").write_bytes(files["b/logo.png"])
    prepared = run_prepare(src, tmp_path / "out", "data.image_size=24")
    assert sorted(f["path"] for f in prepared.manifest.files) == sorted(files)
    assert prepared.images.shape == (8, 24, 24, 3)
    for row, f in enumerate(prepared.manifest.files):
        want, _ = decode(files[f["path"]], (24, 24))
        assert np.array_equal(prepared.images.array[row], want), f["path"]


def test_the_exif_orientation_is_applied(tmp_path):
    """A camera's portrait photo stored sideways, with EXIF orientation 6 (rotate 90 clockwise)."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # white on the left as stored: at the top once turned upright
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = encoded(Image.fromarray(pixels), "PNG", exif=exif)
    for k in range(3):
        for name in ("up", "down"):
            (tmp_path / "src" / name).mkdir(parents=True, exist_ok=True)
            (tmp_path / "src" / name / f"{k}.png").write_bytes(stored)
    prepared = run_prepare(tmp_path / "src", tmp_path / "out", "data.image_size=20")
    upright = np.asarray(Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_270))
    want = np.asarray(Image.fromarray(upright).resize((20, 20), Image.Resampling.BILINEAR))
    assert np.array_equal(prepared.images.array[0], want)
    assert prepared.images.array[0][:5].mean() > 200 and prepared.images.array[0][-5:].mean() < 50


def test_a_train_and_test_layout_keeps_its_own_test_split(tmp_path):
    make_image_folder(tmp_path / "src" / "train", CLASSES, per_class=5)
    make_image_folder(tmp_path / "src" / "test", CLASSES, per_class=2, seed=1)
    cfg = folder_config(tmp_path / "src", prepared=tmp_path / "out")
    prepare(cfg.data, tmp_path / "out")
    prepared = Prepared.open(tmp_path / "out")
    rows = split_rows(prepared, cfg.data, cfg.seed)
    tested = sorted(prepared.manifest.files[i]["path"] for i in rows["test"])
    assert tested == sorted(f"test/{c}/{i}.png" for c in CLASSES for i in range(2))
    assert len(rows["val"]) + len(rows["train"]) == 15
    assert {prepared.labels[i] for i in rows["val"]} == {0, 1, 2}, "a validation image per class"


def splits_by_path(cfg, dest: Path) -> tuple[Prepared, dict[str, str]]:
    """The prepared data in `dest`, and each file's split as `split_rows` assigns it."""
    prepared = Prepared.open(dest)
    rows = split_rows(prepared, cfg.data, cfg.seed)
    files = prepared.manifest.files
    return prepared, {
        files[i]["path"]: split for split in ("train", "val", "test") for i in rows[split]
    }


def test_held_out_splits_are_stratified_and_stay_put_when_images_are_added(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "out"
    make_image_folder(src, CLASSES, per_class=30)
    cfg = folder_config(src, prepared=dest)
    prepare(cfg.data, dest)
    first, before = splits_by_path(cfg, dest)
    # Test: each file whose hash is under test_fraction; validation: the next val_fraction.
    for path, split in before.items():
        u = unit_hash(cfg.seed, path)
        want = "test" if u < 0.1 else "val" if u < 0.2 else "train"
        assert split == want, path
    for split in ("val", "test"):
        classes = {p.split("/")[0] for p, s in before.items() if s == split}
        assert classes == set(CLASSES), split
    for k in range(10):
        Image.new("RGB", (40, 56), (k, 0, 0)).save(src / "nut" / f"new{k}.png")
    prepare(cfg.data, dest)
    _, after = splits_by_path(cfg, dest)
    assert len(after) == 100 and {p: after[p] for p in before} == before


def test_only_changed_files_are_decoded_again(tmp_path, capsys):
    src, dest = tmp_path / "src", tmp_path / "out"
    make_image_folder(src, CLASSES, per_class=20)
    run_prepare(src, dest)
    assert "decoded 60 of 60 images" in capsys.readouterr().out
    Image.new("RGB", (40, 56), (200, 10, 10)).save(src / "bolt" / "3.png")
    Image.new("RGB", (40, 56), (10, 200, 10)).save(src / "nut" / "extra.png")
    prepared = run_prepare(src, dest)
    assert "decoded 2 of 61 images" in capsys.readouterr().out
    # What was reused is what a full decode gives.
    full = run_prepare(src, tmp_path / "full")
    assert np.array_equal(prepared.images.array, full.images.array)
    assert prepared.manifest.files == full.manifest.files


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_an_archive_by_path_with_its_md5(tmp_path, kind):
    written = make_image_folder(tmp_path / "leaves", CLASSES, per_class=3)
    archive = tmp_path / f"leaves.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for path in written:
                zf.write(tmp_path / "leaves" / path, f"leaves/{path}")
    else:
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(tmp_path / "leaves", "leaves")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    prepared = run_prepare(archive, tmp_path / "out", f"data.md5={md5}")
    assert prepared.manifest.name == "leaves"
    assert sorted(f["path"] for f in prepared.manifest.files) == sorted(written)
    with pytest.raises(PipelineError, match="md5 of .* expected 0+"):
        run_prepare(archive, tmp_path / "out", f"data.md5={'0' * 32}")


def test_computed_statistics_are_the_training_split_s(tmp_path):
    make_image_folder(tmp_path / "src", CLASSES, per_class=12)
    cfg = folder_config(tmp_path / "src", prepared=tmp_path / "out")
    prepare(cfg.data, tmp_path / "out")
    data = build.datamodule(cfg)
    data.setup("fit")
    pixels = data.prepared.images.array[np.sort(data.rows["train"])].reshape(-1, 3) / 255
    assert data.mean == pytest.approx(pixels.mean(0).tolist(), abs=1e-6)
    assert data.std == pytest.approx(pixels.std(0).tolist(), abs=1e-6)
    assert data.image_size == 32 and data.class_names == CLASSES


@pytest.mark.parametrize("size, classes", [(32, 10), (48, 3), (18, 2), (64, 100)])
def test_the_network_follows_the_data_as_keras_sizes_it(size, classes):
    net = ChapterCNN(num_classes=classes, image_size=size)
    assert sum(p.numel() for p in net.parameters()) == keras_chapter_params(size, classes)
    assert net(torch.zeros(2, 3, size, size)).shape == (2, classes)
    dense = DenseBaseline(num_classes=classes, image_size=size)
    assert dense(torch.zeros(1, 3, size, size)).shape == (1, classes)
    assert keras_chapter_params(32, 10) == 122_570


def test_an_image_too_small_for_the_network_is_one_line():
    with pytest.raises(PipelineError, match="data.image_size=17 is too small for the chapter CNN"):
        ChapterCNN(image_size=17)


# Bad data: one line that says what to do, and the previous preparation kept as it was.


def truncated_jpeg(path: Path) -> None:
    Image.new("RGB", (64, 64), (90, 20, 20)).save(path, "JPEG")
    path.write_bytes(path.read_bytes()[:200])


def bomb(path: Path) -> None:
    """A 26-megapixel PNG of a few kilobytes: decoding it would take 78 MB."""
    Image.new("L", (5100, 5100)).save(path, "PNG")


def remove_all(src: Path) -> None:
    for path in sorted(src.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()


def empty_classes(src: Path) -> None:
    for path in src.rglob("*.png"):
        path.unlink()


def one_class(src: Path) -> None:
    for name in ("nut", "washer"):
        for path in (src / name).iterdir():
            path.unlink()
        (src / name).rmdir()


def too_few(src: Path) -> None:
    for i in range(3):
        (src / "nut" / f"{i}.png").unlink()


def unreadable(src: Path) -> None:
    for i in range(7):
        truncated_jpeg(src / "bolt" / f"broken{i}.jpg")


BAD = {
    "missing": (lambda src: src.rename(src.with_name("gone")), "does not exist"),
    "no-class-folders": (remove_all, r"has no class folders; put each class's images in"),
    "empty-classes": (empty_classes, r"too few images to split .*: bolt \(0\), nut \(0\)"),
    "one-class": (one_class, "one class folder only \\(bolt\\); a classifier needs at least two"),
    "too-few": (too_few, r"too few images to split in .*: nut \(1\); each class needs at least 3"),
    "truncated": (
        unreadable,
        r"7 images cannot be read: bolt/broken0.jpg \(not a readable image: the file is truncated "
        r"or corrupt\), .* and 2 more; fix or remove them, or set data.skip_unreadable=true",
    ),
    "bomb": (
        lambda src: bomb(src / "washer" / "huge.png"),
        r"washer/huge.png \(image of 5100x5100 pixels is too large",
    ),
    "link-outside": (
        lambda src: (src / "nut" / "passwd.png").symlink_to("/etc/passwd"),
        "is a link to /etc/passwd, outside data.source",
    ),
    "link-to-itself": (
        lambda src: (src / "nut" / "self.jpg").symlink_to("self.jpg"),
        r"nut/self.jpg is a link that leads back to itself; remove it, or put the file there",
    ),
    "link-loop": (
        lambda src: [
            (src / "nut" / "a.png").symlink_to("b.png"),
            (src / "nut" / "b.png").symlink_to("a.png"),
        ],  # fmt: skip
        r"nut/a.png is a link that leads back to itself",
    ),
    "loose-image": (
        lambda src: (src / "bolt" / "0.png").rename(src / "stray.png"),
        r"1 images in .* are outside any class folder \(stray.png\); move each into",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_data_is_one_line_and_keeps_the_previous_preparation(tmp_path, case):
    src, dest = tmp_path / "src", tmp_path / "out"
    make_image_folder(src, CLASSES, per_class=4)
    run_prepare(src, dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    damage, message = BAD[case]
    damage(src)
    with pytest.raises(PipelineError, match=message) as error:
        run_prepare(src, dest)
    assert "\n" not in str(error.value)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert [p.name for p in dest.parent.iterdir() if p.name.startswith(".prepare")] == []


def test_unreadable_images_can_be_skipped_and_are_counted(tmp_path, capsys):
    src = tmp_path / "src"
    make_image_folder(src, CLASSES, per_class=4)
    for i in range(2):
        truncated_jpeg(src / "nut" / f"broken{i}.jpg")
    prepared = run_prepare(src, tmp_path / "out", "data.skip_unreadable=true")
    assert len(prepared.labels) == 12
    assert [p for p, _ in prepared.manifest.skipped] == ["nut/broken0.jpg", "nut/broken1.jpg"]
    assert "skipped 2 unreadable images" in capsys.readouterr().out


def test_an_archive_member_pointing_outside_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/0.png", encoded(Image.new("RGB", (8, 8)), "PNG"))
        zf.writestr("../escaped.png", b"x")
    with pytest.raises(PipelineError, match="points outside the target folder"):
        run_prepare(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.png").exists()


def test_test_images_that_copy_training_images_are_counted(tmp_path, capsys):
    src = tmp_path / "src"
    make_image_folder(src / "train", CLASSES, per_class=4)
    make_image_folder(src / "test", CLASSES, per_class=2, seed=1)
    for name in ("0.png", "1.png"):
        (src / "test" / "nut" / name).write_bytes((src / "train" / "nut" / name).read_bytes())
    cfg = folder_config(src, prepared=tmp_path / "out")
    prepare(cfg.data, tmp_path / "out")
    build.datamodule(cfg).setup("fit")
    assert "warning: 2 test images have the same bytes as a training or validation image" in (
        capsys.readouterr().out
    )


def test_the_manifest_names_every_file(tmp_path):
    make_image_folder(tmp_path / "src", CLASSES, per_class=3)
    prepared = run_prepare(tmp_path / "src", tmp_path / "out")
    assert (tmp_path / "out" / MANIFEST).read_text().count('"path"') == 9
    assert (tmp_path / "out" / IMAGES).stat().st_size > 9 * 32 * 32 * 3
    assert prepared.manifest.class_counts() == dict.fromkeys(CLASSES, 3)


def test_an_image_size_past_the_bound_is_refused_by_the_schema():
    from cnnpipe.base.schema import validate

    with pytest.raises(PipelineError) as error:
        validate(folder_config(Path("/data/parts"), "data.image_size=100000"))
    assert str(error.value) == "data.image_size=100000 must be <= 1024"


def test_arrays_that_would_not_fit_on_the_disk_are_refused_before_decoding(tmp_path):
    src, disk = tmp_path / "src", tmp_path / "disk"
    make_image_folder(src, CLASSES, per_class=4)  # 12 images
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)])
    if mounted.returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        free = shutil.disk_usage(disk).free
        with pytest.raises(PipelineError) as error:
            run_prepare(src, disk / "out", "data.image_size=200")
        needed = 12 * 200 * 200 * 3
        assert str(error.value) == (
            f"12 images at data.image_size=200 take {needed / 1e6:.1f} MB as arrays, and the disk "
            f"of {disk} has {free / 1e6:.1f} MB free; free space there, or lower data.image_size"
        )
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_decode_that_would_not_fit_in_memory_is_refused_before_it_starts(tmp_path, monkeypatch):
    from cnnpipe.data import preparation

    src = tmp_path / "src"
    make_image_folder(src, CLASSES, per_class=3)
    monkeypatch.setattr(preparation, "available_memory", lambda: 10_000_000)
    with pytest.raises(PipelineError) as error:
        run_prepare(src, tmp_path / "out", "data.image_size=1024")
    # 9 images in one task, held by its worker and on the way back, and a block of 9 rows copied.
    needed = (2 * 9 + 9) * 1024 * 1024 * 3
    assert str(error.value) == (
        f"decoding 9 images at data.image_size=1024 needs about {needed / 1e6:.1f} MB of memory, "
        "and 10.0 MB is available; lower data.image_size"
    )

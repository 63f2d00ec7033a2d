import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnpipe.base.schema import TTA_VIEWS
from cnnpipe.data.images import decode
from cnnpipe.serving.onnx_model import OnnxModel
from tests.helpers import CLASSES, cnnpipe, export_random_model, foreign_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    return export_random_model(path, CLASSES, TTA_VIEWS)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((32, 32), 128, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.gif")
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / "big.jpg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / "truncated.png").write_bytes((folder / "rgb.png").read_bytes()[:60])
    return folder, rgb


def test_predict_reports_bad_files_and_still_classifies_the_rest(model_path, images):
    folder, rgb = images
    result = cnnpipe("predict", model_path, folder, "--format", "json", "--top-k", "2")
    assert result.returncode == 1
    rows = {Path(r["path"]).name: r for r in json.loads(result.stdout)}
    assert {n for n, r in rows.items() if "error" in r} == {
        "empty.png",
        "notes.txt",
        "truncated.png",
    }
    ok = {n: r for n, r in rows.items() if "error" not in r}
    assert set(ok) == {"rgb.png", "gray.png", "rgba.png", "palette.gif", "big.jpg"}
    assert all(len(r["predictions"]) == 2 for r in ok.values())
    assert ok["big.jpg"]["note"] == "resized from 64x48" and ok["rgb.png"]["note"] is None
    assert sum(1 for line in result.stderr.splitlines() if ": error: " in line) == 3

    # The probabilities are the model's for exactly these pixels.
    classifier = OnnxModel.load(model_path)
    probs = classifier.probabilities(rgb[None])[0]
    top = ok["rgb.png"]["predictions"][0]
    assert top["label"] == CLASSES[int(probs.argmax())]
    assert top["probability"] == pytest.approx(float(probs.max()), abs=1e-6)


def test_table_and_csv_formats_and_globs(model_path, images):
    folder, _ = images
    table = cnnpipe("predict", model_path, folder / "*.png", "--top-k", "1")
    assert table.returncode == 1  # empty.png and truncated.png match the glob
    assert len(table.stdout.strip().splitlines()) == 3  # rgb, gray, rgba
    assert all("%" in line for line in table.stdout.splitlines())
    csv_out = cnnpipe(
        "predict", model_path, folder / "rgb.png", folder / "big.jpg", "--format", "csv"
    )
    assert csv_out.returncode == 0
    lines = csv_out.stdout.strip().splitlines()
    assert lines[0] == "path,rank,label,probability,note" and len(lines) == 1 + 2 * 3


def test_missing_truncated_or_foreign_model_is_one_line(tmp_path, images, model_path):
    folder, _ = images
    (tmp_path / "x.onnx").write_bytes(b"not onnx")
    (tmp_path / "half.onnx").write_bytes(model_path.read_bytes()[:2000])
    for model in (tmp_path / "x.onnx", tmp_path / "half.onnx", tmp_path / "missing.onnx"):
        result = cnnpipe("predict", model, folder / "rgb.png")
        assert result.returncode == 1
        assert (
            result.stderr.startswith("cnnpipe predict: error:") and "Traceback" not in result.stderr
        )


def test_a_model_of_another_shape_is_refused_in_one_line(tmp_path, images):
    folder, _ = images
    other = foreign_model(tmp_path / "other.onnx", CLASSES)
    result = cnnpipe("predict", other, folder / "rgb.png")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        f"cnnpipe predict: error: {other} takes float (N, 10) and returns float (N, 10); cnnpipe "
        "needs uint8 (N, H, W, 3) images in and float (N, 10) out, one probability per class "
        "name: export the model with `cnnpipe export`\n"
    )


def encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize(
    "image, fmt",
    [
        (Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)), "PNG"),
        (Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"),
        (Image.new("LA", (20, 20), (200, 100)), "PNG"),
        (Image.new("1", (33, 31), 1), "BMP"),
    ],
    ids=["16-bit", "cmyk", "gray-alpha", "1-bit"],
)
def test_unusual_modes_decode_to_rgb(image, fmt):
    pixels, _ = decode(encode(image, fmt), (32, 32))
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8


@pytest.mark.parametrize(
    "deep, fmt",
    [
        (lambda gray: Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
        (lambda gray: Image.fromarray(gray.astype(np.int32) * 257), "TIFF"),
        (lambda gray: Image.fromarray(gray.astype(np.float32) / 255), "TIFF"),
    ],
    ids=["16-bit", "32-bit", "float"],
)
def test_deep_gray_decodes_like_its_8_bit_version(deep, fmt):
    gray = np.random.default_rng(4).integers(0, 256, (32, 32), dtype=np.uint8)
    image = deep(gray)
    assert image.mode in ("I;16", "I", "F")
    pixels, _ = decode(encode(image, fmt), (32, 32))
    assert np.array_equal(pixels, decode(encode(Image.fromarray(gray), "PNG"), (32, 32))[0])


def test_cmyk_red_stays_red():
    pixels, _ = decode(encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"), (32, 32))
    r, g, b = pixels.reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


def test_huge_claimed_size_is_refused_before_decoding():
    bomb = encode(Image.new("L", (6000, 5000)), "PNG")
    assert len(bomb) < 200_000, "a small file"
    with pytest.raises(ValueError, match="6000x5000 pixels is too large"):
        decode(bomb, (32, 32))


def test_an_image_over_pillows_own_limit_is_refused_in_one_line_without_warnings():
    # 10,000 x 10,000 pixels: over Pillow's warning limit (89 million), under its error limit.
    bomb = encode(Image.new("1", (10_000, 10_000)), "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="10000x10000 pixels is too large"):
            decode(bomb, (32, 32))


def test_a_model_of_another_size_gets_its_images_at_its_size(tmp_path):
    """A 48x48 model of three classes: predict and the service decode to 48x48, and the v2
    protocol asks for its shape."""
    import json
    import urllib.error
    import urllib.request

    from cnnpipe.serving.app import create_app
    from cnnpipe.serving.server import running

    names = ["bolt", "nut", "washer"]
    model = export_random_model(tmp_path / "m.onnx", names, image_size=48)
    photo = tmp_path / "photo.png"
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (30, 70, 3), np.uint8))
    image.save(photo)
    pixels, note = decode(photo.read_bytes(), (48, 48))
    assert pixels.shape == (48, 48, 3) and note == "resized from 70x30"
    want = OnnxModel.load(model).probabilities(pixels[None])[0]
    result = cnnpipe("predict", model, photo, "--format", "json", "--top-k", "3")
    (row,) = json.loads(result.stdout)
    assert {p["label"]: p["probability"] for p in row["predictions"]} == pytest.approx(
        dict(zip(names, want.tolist(), strict=True))
    )
    with running(create_app(str(model))) as url:
        meta = json.loads(urllib.request.urlopen(f"{url}/metadata", timeout=30).read())
        assert meta["model"]["input"]["shape"] == [-1, 48, 48, 3]
        assert meta["request"].endswith("resized to 48x48")
        tensor = {"name": "images", "shape": [1, 32, 32, 3], "datatype": "UINT8",
                  "data": [0] * 3072}  # fmt: skip
        request = urllib.request.Request(
            f"{url}/v2/models/cnnpipe-test/infer", json.dumps({"inputs": [tensor]}).encode()
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert "shape must be [N, 48, 48, 3]" in refused.value.read().decode()

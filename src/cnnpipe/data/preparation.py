"""The prepare stage's work: the configured images (CIFAR-10's batch files, or a folder of
images or an archive of one), decoded once into the prepared arrays every later stage reads."""

import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import psutil
from omegaconf import DictConfig

from cnnpipe import PipelineError
from cnnpipe.base.config import dataset_name
from cnnpipe.base.files import partial_name, swap
from cnnpipe.data.cifar import ARCHIVE_DIR, BATCH_FILES, read_batches
from cnnpipe.data.decoding import block_rows, chunk_files, decode_entries, footprint
from cnnpipe.data.download import as_url, extract, fetch_archive
from cnnpipe.data.folder import Entry, check_counts, labelled, listing, missing_source, scan
from cnnpipe.data.prepared import IMAGES, Manifest, Prepared, create_images, write_index


def previous(dest: Path) -> Prepared | None:
    """The preparation already in `dest`, whose unchanged images need not be decoded again."""
    try:
        return Prepared.open(dest)
    except PipelineError:
        return None


def prepare_cifar(data: DictConfig, work: Path, dest: Path) -> Manifest:
    """CIFAR-10's archive downloaded, checked by md5 and read, safely, into the arrays."""
    url = as_url(data.source)
    archive = fetch_archive(url, data.md5, work / "cifar-10-python.tar.gz", data.timeout_s)
    wanted = {ARCHIVE_DIR, *(f"{ARCHIVE_DIR}/{name}" for name in BATCH_FILES)}
    extract(archive, work / "extracted", lambda name: name in wanted)
    batches = work / "extracted" / ARCHIVE_DIR
    missing = [name for name in BATCH_FILES if not (batches / name).is_file()]
    if missing:
        raise PipelineError(f"{url} has no {ARCHIVE_DIR}/{', '.join(missing)}")
    try:
        classes, images, files = read_batches(batches)
    except PipelineError as error:
        reason = str(error).replace(f"{batches}/", f"{ARCHIVE_DIR}/")
        raise PipelineError(f"{url}: {reason}; {dest} was left as it was") from None
    size = images.shape[1]
    create_images(work / "out", len(images), size)[:] = images
    return Manifest(dataset_name(data), url, size, classes, files)


def folder_root(data: DictConfig, work: Path) -> tuple[Path, str]:
    """The folder to read, and the source as a URL: the folder itself, or an archive (by path or
    URL, with its md5) extracted into `work`."""
    source = str(data.source)
    local = Path(source).expanduser()
    if "://" not in source and local.is_dir():
        return local, local.resolve().as_uri()
    if "://" not in source and not local.exists():
        raise missing_source(local)
    url = as_url(source)
    archive = fetch_archive(url, data.md5, work / "archive", data.timeout_s)
    extract(archive, work / "extracted")
    # An archive of one folder (leaves.zip holding leaves/...) is read from inside it.
    inside = [p for p in (work / "extracted").iterdir() if not p.name.startswith(".")]
    if len(inside) == 1 and inside[0].is_dir() and inside[0].name not in ("train", "test"):
        return inside[0], url
    return work / "extracted", url


def prepare_folder(data: DictConfig, work: Path, dest: Path) -> Manifest:
    """The folder's images decoded at data.image_size, the unchanged ones reused from `dest`."""
    if not data.source:
        raise PipelineError(
            "data.source is not set; point it at your images: "
            "dvc exp run -S data=folder -S data.source=/path/to/images"
        )
    root, url = folder_root(data, work)
    classes, entries = scan(root)
    size = data.image_size
    check_room(work, len(entries), size)
    images = create_images(work / "all", len(entries), size)
    start = time.perf_counter()
    result = decode_entries(root, entries, size, images, previous(dest))
    seconds = time.perf_counter() - start
    rate = f", {result.decoded / seconds:,.0f} images/s" if result.decoded else ""
    unchanged = len(entries) - result.decoded
    kept = f"; {unchanged:,} unchanged since the last preparation" if unchanged else ""
    done = f"decoded {result.decoded:,} of {len(entries):,} images ({root}) in {seconds:.1f} s"
    print(done + rate + kept)
    keep = readable(data, root, classes, entries, result.errors)
    if len(keep) == len(entries):
        (work / "all").rename(work / "out")
    else:
        out = create_images(work / "out", len(keep), size)
        block = block_rows(size)
        for start in range(0, len(keep), block):
            part = keep[start : start + block]
            out[start : start + len(part)] = images[part]
    files = [{**asdict(entries[i]), "sha256": result.digests[i]} for i in keep]
    skipped = [[entries[i].path, reason] for i, reason in sorted(result.errors.items())]
    return Manifest(dataset_name(data), url, size, classes, files, skipped)


def check_room(work: Path, images: int, size: int) -> None:
    """Refuse, before anything is decoded, a data set whose arrays would not fit on the disk of
    `work`, or whose decoding would not fit in the memory there is."""
    workers = min(os.cpu_count() or 1, -(-images // chunk_files(size)))
    memory, disk = footprint(images, size, workers)
    what = f"{images:,} images at data.image_size={size}"
    free = shutil.disk_usage(work).free
    if disk > free:
        raise PipelineError(
            f"{what} take {in_words(disk)} as arrays, and the disk of {work.parent.resolve()} has "
            f"{in_words(free)} free; free space there, or lower data.image_size"
        )
    if memory > (available := available_memory()):
        raise PipelineError(
            f"decoding {what} needs about {in_words(memory)} of memory, and "
            f"{in_words(available)} is available; lower data.image_size"
        )


def available_memory() -> int:
    """What this process may still take: the system's available memory, or what is left under
    its cgroup's limit (a container's) where that is less."""
    available = psutil.virtual_memory().available
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return available


def in_words(size: int) -> str:
    return f"{size / 1e9:,.1f} GB" if size >= 1e9 else f"{size / 1e6:,.1f} MB"


def readable(
    data: DictConfig, root: Path, classes: list[str], entries: list[Entry], errors: dict[int, str]
) -> list[int]:
    """The entries to keep: all of them, or with data.skip_unreadable those that decoded;
    otherwise unreadable images stop the stage, naming them."""
    if not errors:
        return list(range(len(entries)))
    bad = [f"{entries[i].path} ({reason})" for i, reason in sorted(errors.items())]
    if not data.skip_unreadable:
        raise PipelineError(
            f"{len(bad)} images cannot be read: {listing(bad)}; fix or remove them, or set "
            "data.skip_unreadable=true to leave them out"
        )
    print(f"skipped {len(bad):,} unreadable images (listed in the manifest): {listing(bad)}")
    keep = [i for i in range(len(entries)) if i not in errors]
    check_counts(root, classes, [entries[i] for i in keep])
    return keep


def decode_labelled(
    folder: Path, classes: list[str], size: int
) -> tuple[list[Entry], list[str], np.ndarray | None]:
    """Every image under `folder`, decoded: a label written while this runs is taken too, by
    listing the folder again until a listing brings nothing new."""
    entries: list[Entry] = []
    digests: list[str] = []
    parts: list[np.ndarray] = []
    for _ in range(5):
        done = {e.path for e in entries}
        new = [e for e in labelled(folder, classes) if e.path not in done]
        if not new:
            return entries, digests, np.concatenate(parts) if parts else None
        rows = np.empty((len(new), size, size, 3), np.uint8)
        result = decode_entries(folder, new, size, rows, None)
        if result.errors:
            bad = [f"{new[i].path} ({reason})" for i, reason in sorted(result.errors.items())]
            raise PipelineError(
                f"{len(bad)} labelled images in {folder} cannot be read: {listing(bad)}; remove "
                "them, or label them again with `cnnpipe review`"
            )
        entries, digests, parts = entries + new, digests + result.digests, [*parts, rows]
    raise PipelineError(f"labels kept arriving in {folder} while prepare ran; run it again")


def add_labelled(data: DictConfig, work: Path, manifest: Manifest) -> Manifest:
    """The images under data.extra_train, appended to the arrays in `work`/out as training
    images: the splits of every other image stay as they were."""
    folder = Path(data.extra_train or "")
    if not data.extra_train or not folder.is_dir():
        return manifest
    size = manifest.image_size
    entries, digests, extra = decode_labelled(folder, manifest.classes, size)
    if not entries:
        return manifest
    base = np.load(work / "out" / IMAGES, mmap_mode="r")
    images = create_images(work / "with-labelled", len(base) + len(extra), size)
    block = block_rows(size)
    for start in range(0, len(base), block):
        stop = min(start + block, len(base))
        images[start:stop] = base[start:stop]
    images[len(base) :] = extra
    images.flush()
    shutil.rmtree(work / "out")
    (work / "with-labelled").rename(work / "out")
    added = [
        {**asdict(e), "path": f"{folder.as_posix()}/{e.path}", "sha256": sha}
        for e, sha in zip(entries, digests, strict=True)
    ]
    print(f"added {len(added):,} labelled training images from {folder}")
    return Manifest(**{**asdict(manifest), "files": [*manifest.files, *added]})


LAYOUTS = {"cifar10_batches": prepare_cifar, "image_folder": prepare_folder}


def prepare(data: DictConfig, dest: Path) -> Manifest:
    """Write the prepared data set `data` describes to `dest`, which is replaced only when
    everything succeeded."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=partial_name(dest.name) + "-") as tmp:
        work = Path(tmp)
        if data.layout not in LAYOUTS:
            raise PipelineError(f"data.layout={data.layout} is not one of {', '.join(LAYOUTS)}")
        manifest = add_labelled(data, work, LAYOUTS[data.layout](data, work, dest))
        write_index(work / "out", manifest)
        swap(work / "out", dest)
    return manifest

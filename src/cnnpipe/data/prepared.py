"""The prepared data set: what the prepare stage writes and every later stage reads, the same for
CIFAR-10's batch files and for a folder of images. Numpy only.

    images.npy     uint8 (N, S, S, 3): every image, decoded and resized once
    labels.npy     int64 (N,)
    manifest.json  the data set's name, source and image size, the class names, and each file
                   with its label, the split its folder gave it (or null), digest, size and mtime

Row i of the arrays is the manifest's file i. Images are read a batch at a time through a memory
map, so a data set larger than memory trains.
"""

import hashlib
import json
import mmap
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cnnpipe import PipelineError

IMAGES, LABELS, MANIFEST = "images.npy", "labels.npy", "manifest.json"


@dataclass
class Manifest:
    name: str
    source: str
    image_size: int
    classes: list[str]
    # {"path", "label", "split", "sha256", "size", "mtime_ns"} per image, in the arrays' order.
    files: list[dict]
    # Unreadable files left out with data.skip_unreadable: (path, reason).
    skipped: list[list[str]] = field(default_factory=list)

    def digest(self, rows: np.ndarray | None = None) -> str:
        """The data by content (16 hex digits), or that of `rows`: the same images, labels and
        splits at the same size give the same digest, wherever they came from."""
        h = hashlib.sha256(f"{self.image_size} {json.dumps(self.classes)}".encode())
        for f in self.files if rows is None else [self.files[i] for i in rows]:
            h.update(f"{f['sha256']} {f['label']} {f['split']}\n".encode())
        return h.hexdigest()[:16]

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount([f["label"] for f in self.files], minlength=len(self.classes))
        return dict(zip(self.classes, map(int, counts), strict=True))


def require_prepared(folder: Path | str) -> None:
    """PipelineError unless the prepare stage's output is in `folder`."""
    if not (Path(folder) / MANIFEST).is_file():
        raise PipelineError(f"no prepared data in {folder}; run `dvc repro prepare`")


def read_manifest(folder: Path) -> Manifest:
    require_prepared(folder)
    try:
        return Manifest(**json.loads((Path(folder) / MANIFEST).read_text()))
    except (ValueError, TypeError) as error:
        raise PipelineError(
            f"{Path(folder) / MANIFEST} is not a manifest of the prepare stage ({error}); run "
            "`dvc repro -f prepare`"
        ) from None


class ImageArray:
    """images.npy through a memory map. `take` copies rows out; after every READ_BUDGET bytes it
    hands the mapped pages back to the page cache, so the process holds a bounded part of the
    images, not every image it has read. (The kernel maps up to 64 KB around each page read, so
    what stays mapped between two hand-backs is a few times the budget.)"""

    # Handing pages back after every batch cost about 5 s of system time per CIFAR-10 epoch on
    # two cores; once per 16 MB read costs nothing measurable.
    READ_BUDGET = 16 << 20

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(f)
            # Never an object array: unpickling one could run code.
            if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
                raise ValueError(f"{dtype} {shape} is not uint8 (N, H, W, 3)")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.array = np.ndarray(shape, dtype, buffer=self._map, offset=f.tell())
        self._read = 0

    def __len__(self) -> int:
        return len(self.array)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def take(self, rows: np.ndarray) -> np.ndarray:
        out = self.array[rows]
        self._read += out.nbytes
        if self._read >= self.READ_BUDGET:
            self._map.madvise(mmap.MADV_DONTNEED)
            self._read = 0
        return out


@dataclass
class Prepared:
    manifest: Manifest
    images: ImageArray
    labels: np.ndarray

    @classmethod
    def open(cls, folder: Path | str) -> "Prepared":
        folder = Path(folder)
        manifest = read_manifest(folder)
        try:
            images, labels = ImageArray(folder / IMAGES), np.load(folder / LABELS)
        except (OSError, ValueError, TypeError) as error:
            raise PipelineError(
                f"{folder} holds no readable prepared arrays ({error}); run `dvc repro -f prepare`"
            ) from None
        if not len(images) == len(labels) == len(manifest.files):
            raise PipelineError(f"{folder}: arrays and manifest differ in length; rerun prepare")
        return cls(manifest, images, labels)


def create_images(folder: Path, n: int, size: int) -> np.ndarray:
    """A new uint8 (n, size, size, 3) images.npy in `folder`, as a writable memory map."""
    folder.mkdir(parents=True, exist_ok=True)
    shape = (n, size, size, 3)
    return np.lib.format.open_memmap(folder / IMAGES, mode="w+", dtype=np.uint8, shape=shape)


def write_index(folder: Path, manifest: Manifest) -> None:
    """labels.npy and manifest.json beside images.npy: the manifest last, as the mark that the
    folder is complete."""
    np.save(folder / LABELS, np.array([f["label"] for f in manifest.files], dtype=np.int64))
    head = {k: v for k, v in asdict(manifest).items() if k != "files"}
    # One file a line: a person can read it, and diff two of them.
    files = ",\n".join(json.dumps(f) for f in manifest.files)
    (folder / MANIFEST).write_text(
        json.dumps(head, indent=1)[:-2] + f',\n "files": [\n{files}\n]}}\n'
    )


def unit_hash(seed: int, path: str) -> float:
    """A number in [0, 1) fixed by `seed` and `path` alone: a file's split never depends on
    which other files there are."""
    digest = hashlib.sha256(f"{seed}/{path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def duplicates_across(manifest: Manifest, a: np.ndarray, b: np.ndarray) -> int:
    """How many images of rows `b` have the same bytes as an image of rows `a`."""
    seen = {manifest.files[i]["sha256"] for i in a}
    return sum(manifest.files[i]["sha256"] in seen for i in b)


def channel_stats(images: ImageArray, rows: np.ndarray, chunk: int = 2048) -> tuple[list, list]:
    """Per-channel mean and std of `rows`' pixels on the 0-1 scale, read a chunk at a time."""
    total = np.zeros(3)
    squares = np.zeros(3)
    for start in range(0, len(rows), chunk):
        pixels = images.take(np.sort(rows[start : start + chunk])).reshape(-1, 3) / 255.0
        total += pixels.sum(0)
        squares += (pixels**2).sum(0)
    n = len(rows) * images.shape[1] * images.shape[2]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 0))
    # A channel that never changes would divide by zero; one grey level is its scale then.
    std = np.maximum(std, 1 / 255)
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def write_random(folder: Path, train: int, test: int, size: int = 32, classes: int = 10) -> None:
    """A prepared data set of random images and labels, for benchmarks that time the work and
    not the data: `train` training and `test` test images of `size` pixels square."""
    rng = np.random.default_rng(0)
    n = train + test
    create_images(folder, n, size)[:] = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    files = [
        {"path": f"random/{i}", "label": int(label), "split": "test" if i >= train else "train",
         "sha256": f"{i:016x}", "size": 0, "mtime_ns": 0}
        for i, label in enumerate(rng.integers(0, classes, n))
    ]  # fmt: skip
    names = [f"class{k}" for k in range(classes)]
    write_index(folder, Manifest("random", folder.resolve().as_uri(), size, names, files))

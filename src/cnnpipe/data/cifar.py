"""CIFAR-10's batch files: their names and a safe reader (they are pickles, and a pickle can run
code). Numpy only, so that `cnnpipe prepare` can check a download before it replaces the data.
"""

import hashlib
import pickle
from pathlib import Path

import numpy as np

from cnnpipe import PipelineError

# The official archive's folder and files (it also holds a readme.html).
ARCHIVE_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
BATCH_FILES = [*TRAIN_BATCHES, TEST_BATCH, META]

# What numpy arrays need to unpickle, under both the numpy 1 and the numpy 2 module names.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    """Pickle is code: only the numpy constructors a CIFAR batch needs may be called."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def unpickle(path: Path) -> dict:
    """Load a CIFAR pickle (Python 2 or 3) with str keys, refusing anything that is not data."""
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise PipelineError(f"no {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise PipelineError(f"{path} is not a safe CIFAR batch ({error})") from None
    if not isinstance(obj, dict):
        raise PipelineError(f"{path} holds a {type(obj).__name__}, not a CIFAR batch dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def load_batch(path: Path, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (N, 3072) and labels as int64 (N,) from one batch file, checked."""
    batch = unpickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise PipelineError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
    if data.shape[1] != 3 * 32 * 32 or not isinstance(labels, list) or len(labels) != len(data):
        raise PipelineError(f"{path}: expected (N, 3072) images and N labels, got {data.shape}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise PipelineError(f"{path}: labels must be integers") from None
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise PipelineError(f"{path}: labels must lie in 0..{num_classes - 1}")
    return data, labels


def read_class_names(data_dir: Path) -> list[str]:
    names = unpickle(Path(data_dir) / META).get("label_names")
    if not isinstance(names, list) or not names:
        raise PipelineError(f"{data_dir / META} has no label_names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read_batches(folder: Path) -> tuple[list[str], np.ndarray, list[dict]]:
    """The class names, every image as uint8 (N, 32, 32, 3) (training batches first, then the
    test batch) and a manifest entry for each: "data_batch_1/0", its label, split and digest."""
    classes = read_class_names(folder)
    images, files = [], []
    for name in [*TRAIN_BATCHES, TEST_BATCH]:
        data, labels = load_batch(folder / name, len(classes))
        split = "test" if name == TEST_BATCH else "train"
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        files += [
            {
                "path": f"{name}/{i}",
                "label": int(label),
                "split": split,
                "sha256": hashlib.sha256(row.tobytes()).hexdigest()[:16],
                "size": row.size,
                "mtime_ns": 0,
            }
            for i, (row, label) in enumerate(zip(data, labels, strict=True))
        ]
    return classes, np.concatenate(images), files

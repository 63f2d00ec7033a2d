"""Read CIFAR-10 batch files safely and serve them from memory, augmented batch by batch."""

import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from cnnpipe import PipelineError

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"

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
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise PipelineError(
            f"{path} is not a safe CIFAR batch ({error}); run `dvc repro fetch`"
        ) from None
    if not isinstance(obj, dict):
        raise PipelineError(f"{path} holds a {type(obj).__name__}, not a CIFAR batch dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_batch(path: Path, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 (N, 3, 32, 32) and labels as int64 (N,) from one batch file."""
    batch = unpickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise PipelineError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
    if data.shape[1] != 3 * 32 * 32 or not isinstance(labels, list) or len(labels) != len(data):
        raise PipelineError(f"{path}: expected (N, 3072) images and N labels, got {data.shape}")
    labels = torch.tensor(labels, dtype=torch.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise PipelineError(f"{path}: labels must lie in 0..{num_classes - 1}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


def read_split(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    names = TRAIN_BATCHES if split == "train" else [TEST_BATCH]
    parts = [read_batch(Path(data_dir) / name) for name in names]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def read_class_names(data_dir: Path) -> list[str]:
    names = unpickle(Path(data_dir) / META).get("label_names")
    if not isinstance(names, list) or not names:
        raise PipelineError(f"{data_dir / META} has no label_names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `padding` pixels, filling with zeros: one gather per axis."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1, 1), generator=generator)
    rows = padded.gather(
        2, (dy + torch.arange(h).view(1, 1, h, 1)).expand(-1, c, -1, w + 2 * padding)
    )
    return rows.gather(3, (dx + torch.arange(w).view(1, 1, 1, w)).expand(-1, c, h, -1))


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


class BatchLoader:
    """(uint8 images, labels) batches from tensors in memory, optionally shuffled and augmented."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        crop_padding: int = 0,
        flip: bool = False,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.shuffle, self.crop_padding, self.flip = shuffle, crop_padding, flip
        self.generator = generator or torch.Generator()
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return -(-(len(self.images) // self.world_size) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.images)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        # Under DDP every process draws the same order and takes an equal share of it.
        order = order[self.rank : n - n % self.world_size : self.world_size]
        n = len(order)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            images = self.images[index]
            if self.crop_padding:
                images = random_crop(images, self.crop_padding, self.generator)
            if self.flip:
                images = random_flip(images, self.generator)
            yield images, self.labels[index]


class CIFAR10DataModule(pl.LightningDataModule):
    """The training set split into augmented train and plain validation parts, held in memory."""

    def __init__(
        self,
        data_dir: str,
        batch_size: int,
        val_size: int,
        crop_padding: int,
        flip: bool,
        seed: int,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        images, labels = read_split(Path(hp.data_dir), "train")
        if not 0 < hp.val_size < len(images):
            raise PipelineError(
                f"data.val_size={hp.val_size} must lie between 0 and the {len(images)} "
                "training images"
            )
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(hp.seed))
        val, train = order[: hp.val_size], order[hp.val_size :]
        self.train_images, self.train_labels = images[train], labels[train]
        self.val_images, self.val_labels = images[val], labels[val]
        self.class_names = read_class_names(Path(hp.data_dir))
        # Shuffles and augmentations draw from this one generator, which checkpoints carry, so a
        # resumed run sees the batches the interrupted one would have seen.
        self.generator = torch.Generator().manual_seed(hp.seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def train_dataloader(self) -> BatchLoader:
        hp = self.hparams
        return BatchLoader(
            self.train_images,
            self.train_labels,
            hp.batch_size,
            shuffle=True,
            crop_padding=hp.crop_padding,
            flip=hp.flip,
            generator=self.generator,
            rank=self.trainer.global_rank if self.trainer else 0,
            world_size=self.trainer.world_size if self.trainer else 1,
        )

    def val_dataloader(self) -> BatchLoader:
        return BatchLoader(self.val_images, self.val_labels, self.hparams.batch_size)

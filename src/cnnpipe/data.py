"""Serve the CIFAR-10 batch files from memory, augmented batch by batch."""

from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from cnnpipe import PipelineError
from cnnpipe.cifar import TEST_BATCH, TRAIN_BATCHES, load_batch, read_class_names


def read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 (N, 3, 32, 32) and labels as int64 (N,) from one batch file."""
    data, labels = load_batch(path)
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def read_split(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    names = TRAIN_BATCHES if split == "train" else [TEST_BATCH]
    parts = [read_batch(Path(data_dir) / name) for name in names]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


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

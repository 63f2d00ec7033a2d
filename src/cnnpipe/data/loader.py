"""The prepared data set as training, validation and test splits, served in augmented batches."""

from collections.abc import Iterator

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from cnnpipe import PipelineError
from cnnpipe.data.prepared import ImageArray, Prepared, channel_stats, duplicates_across, unit_hash


def split_rows(prepared: Prepared, data: DictConfig, seed: int) -> dict[str, np.ndarray]:
    """The rows of each split: "train", "val" and "test", and "pool" (every row that is not test,
    in file order). A split the source gave (CIFAR-10's test batch, a test/ folder) is kept;
    otherwise test and validation files are held out by a seeded hash of their path, per class
    (`unit_hash`), so adding files never moves others. With `data.val_size`, validation is that
    many pool images drawn by `seed` instead, as the CIFAR-10 recipe has always drawn it. The
    training rows come in an order drawn by `seed`. Labelled images (data.extra_train, split
    "extra") only ever train: validation and test are the same images with or without them."""
    test, u, given = test_mask(prepared, data, seed)
    labels = prepared.labels
    extra = extra_rows(prepared)
    pool = np.flatnonzero(~test & ~extra)
    generator = torch.Generator().manual_seed(seed)
    if data.get("val_size"):
        if not 0 < data.val_size < len(pool):
            raise PipelineError(
                f"data.val_size={data.val_size} must lie between 0 and the {len(pool)} "
                "training images"
            )
        order = torch.randperm(len(pool), generator=generator).numpy()
        val, train = pool[order[: data.val_size]], pool[order[data.val_size :]]
        train = np.concatenate([train, np.flatnonzero(extra)])
    else:
        # Above the test files' share of the hash, so the two never overlap.
        low = 0 if given else data.test_fraction
        val_mask = (~test) & ~extra & (u >= low) & (u < low + data.val_fraction)
        val_mask = at_least_one_per_class(val_mask, ~test & ~extra & ~val_mask, u, labels)
        val = np.flatnonzero(val_mask)
        train = np.flatnonzero(~test & ~val_mask)
        train = train[torch.randperm(len(train), generator=generator).numpy()]
    return {"train": train, "val": val, "test": np.flatnonzero(test), "pool": np.flatnonzero(~test)}


def extra_rows(prepared: Prepared) -> np.ndarray:
    """Which rows are labelled images of data.extra_train."""
    return np.array([f["split"] == "extra" for f in prepared.manifest.files], bool)


def test_mask(
    prepared: Prepared, data: DictConfig, seed: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Which rows are test images; each file's hash in [0, 1); whether the source gave the
    split."""
    files = prepared.manifest.files
    u = np.array([unit_hash(seed, f["path"]) for f in files])
    given = np.array([f["split"] == "test" for f in files])
    if given.any():
        return given, u, True
    others = ~extra_rows(prepared)
    test = at_least_one_per_class((u < data.test_fraction) & others, others, u, prepared.labels)
    return test, u, False


def at_least_one_per_class(
    chosen: np.ndarray, candidates: np.ndarray, u: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """`chosen` with, for each class that has no chosen file, its candidate of smallest hash:
    a small class still gets a validation and a test image."""
    chosen = chosen.copy()
    for label in np.unique(labels):
        mine = labels == label
        if not (chosen & mine).any() and (candidates & mine).any():
            rows = np.flatnonzero(candidates & mine)
            chosen[rows[np.argmin(u[rows])]] = True
    return chosen


def read_split(cfg: DictConfig, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 (N, 3, S, S) and labels as int64 (N,) of "test", or of "train": every
    image that is not test, validation included, in file order."""
    prepared = Prepared.open(cfg.paths.data)
    test = test_mask(prepared, cfg.data, cfg.seed)[0]
    rows = np.flatnonzero(test if split == "test" else ~test)
    images = torch.from_numpy(prepared.images.take(rows)).permute(0, 3, 1, 2)
    return images, torch.from_numpy(prepared.labels[rows])


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
    """(uint8 (N, 3, S, S) images, labels) batches of `rows` of the prepared images, read from
    disk a batch at a time, optionally shuffled and augmented."""

    def __init__(
        self,
        images: ImageArray,
        labels: torch.Tensor,
        rows: np.ndarray,
        batch_size: int,
        shuffle: bool = False,
        crop_padding: int = 0,
        flip: bool = False,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        self.images, self.labels, self.rows = images, labels, torch.from_numpy(rows)
        self.channels_last = channels_last
        self.batch_size, self.shuffle = batch_size, shuffle
        self.crop_padding, self.flip = crop_padding, flip
        self.generator = generator or torch.Generator()
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return -(-(len(self.rows) // self.world_size) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.rows)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        # Under DDP every process draws the same order and takes an equal share of it.
        order = order[self.rank : n - n % self.world_size : self.world_size]
        n = len(order)
        for start in range(0, n, self.batch_size):
            rows = self.rows[order[start : start + self.batch_size]]
            nhwc = torch.from_numpy(self.images.take(rows.numpy()))
            # The rows as read are NHWC: channels_last as they are, else one copy to NCHW.
            images = nhwc.permute(0, 3, 1, 2)
            if not self.channels_last:
                images = images.contiguous()
            if self.crop_padding:
                images = random_crop(images, self.crop_padding, self.generator)
            if self.flip:
                images = random_flip(images, self.generator)
            yield images, self.labels[rows]


class ImageDataModule(pl.LightningDataModule):
    """The prepared data at `root`: its training split, augmented, and its validation split,
    plain, in batches of `batch_size`, laid out NHWC in memory with `channels_last` (the layout
    oneDNN's convolutions run fastest in on CPU); with the class names, image size, and
    per-channel mean and std (`data.mean` and `data.std`, or computed from the training split
    where they are null). `data` is conf/data's node, `seed` draws the splits and the batches."""

    def __init__(
        self, data: DictConfig, root: str, seed: int, batch_size: int, channels_last: bool = False
    ) -> None:
        super().__init__()
        self.data, self.root, self.seed = data, root, seed
        self.batch_size, self.channels_last = batch_size, channels_last

    def setup(self, stage: str | None = None) -> None:
        data = self.data
        self.prepared = Prepared.open(self.root)
        manifest = self.prepared.manifest
        if manifest.image_size != data.image_size:
            # A sweep's job reads the data `dvc repro` prepared; it cannot prepare its own.
            raise PipelineError(
                f"{self.root} holds {manifest.name} at {manifest.image_size}x"
                f"{manifest.image_size}, not data.image_size={data.image_size}; run "
                "`dvc repro prepare` with that size first"
            )
        self.rows = split_rows(self.prepared, data, self.seed)
        self.labels = torch.from_numpy(self.prepared.labels)
        self.class_names, self.image_size = manifest.classes, manifest.image_size
        if data.mean is None or data.std is None:
            self.mean, self.std = channel_stats(self.prepared.images, self.rows["train"])
        else:
            self.mean, self.std = list(data.mean), list(data.std)
        if leaked := duplicates_across(manifest, self.rows["pool"], self.rows["test"]):
            print(
                f"warning: {leaked} test images have the same bytes as a training or validation "
                f"image of {manifest.name}; the test accuracy overstates what the model does on "
                "new images (remove the copies from the source)"
            )
        # Shuffles and augmentations draw from this one generator, which checkpoints carry, so a
        # resumed run sees the batches the interrupted one would have seen.
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def train_size(self) -> int:
        return len(self.rows["train"])

    def train_sample(self, n: int) -> torch.Tensor:
        """The first `n` training images in the seeded order, uint8 (n, 3, S, S)."""
        rows = self.rows["train"][:n]
        return torch.from_numpy(self.prepared.images.take(rows)).permute(0, 3, 1, 2).contiguous()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def train_dataloader(self) -> BatchLoader:
        return BatchLoader(
            self.prepared.images,
            self.labels,
            self.rows["train"],
            self.batch_size,
            shuffle=True,
            crop_padding=self.data.crop_padding,
            flip=self.data.flip,
            generator=self.generator,
            rank=self.trainer.global_rank if self.trainer else 0,
            world_size=self.trainer.world_size if self.trainer else 1,
            channels_last=self.channels_last,
        )

    def val_dataloader(self) -> BatchLoader:
        rows = self.rows["val"]
        return BatchLoader(
            self.prepared.images,
            self.labels,
            rows,
            self.batch_size,
            channels_last=self.channels_last,
        )

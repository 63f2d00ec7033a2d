import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from cnnpipe import PipelineError
from cnnpipe.base.config import outputs_under
from cnnpipe.data.cifar import load_batch, unpickle
from cnnpipe.data.loader import BatchLoader, random_crop, random_flip, read_split
from cnnpipe.data.prepared import ImageArray, write_random
from cnnpipe.training import build
from cnnpipe.training.fit import train
from tests.helpers import composed


def read_batch(path):
    """One batch file as (N, 3, 32, 32) tensors, as the prepare stage lays them out."""
    data, labels = load_batch(path)
    return torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.from_numpy(labels)


def image_array(folder, images: np.ndarray) -> ImageArray:
    np.save(folder / "images.npy", images)
    return ImageArray(folder / "images.npy")


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_unpickler_refuses_a_pickle_that_runs_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": RunsCode(), "labels": []}))
    with pytest.raises(PipelineError, match="refusing to load posix.system"):
        unpickle(path)
    assert not (tmp_path / "pwned").exists()


def test_unpickler_reads_python2_style_bytes_keys(tmp_path):
    path = tmp_path / "batch"
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    path.write_bytes(pickle.dumps({b"data": data, b"labels": [3, 9]}, protocol=4))
    images, labels = read_batch(path)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [3, 9]
    # Rows hold the red plane, then green, then blue, each 32 x 32 row-major.
    assert images[0, 1, 0, 0] == data[0, 1024] and images[1, 2, 31, 31] == data[1, 3071]


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, "uint8"),
        ({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, "3072"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, "N labels"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, r"0\.\.9"),
        ([1, 2, 3], "not a CIFAR batch"),
    ],
    ids=["dtype", "shape", "label-count", "label-range", "not-a-dict"],
)
def test_malformed_batches_are_refused(tmp_path, entry, message):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(entry, protocol=4))
    with pytest.raises(PipelineError, match=message):
        read_batch(path)


def test_read_split_gives_every_training_image_and_the_test_batch(data_dir):
    cfg = composed(f"paths.data={data_dir}")
    images, labels = read_split(cfg, "train")
    assert images.shape == (200, 3, 32, 32) and len(labels) == 200
    assert read_split(cfg, "test")[0].shape == (50, 3, 32, 32)


def test_random_crop_shifts_each_image_within_the_padding():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    cropped = random_crop(images, 4, g)
    assert cropped.shape == images.shape and cropped.dtype == torch.uint8
    shifts = set()
    for original, out in zip(images, cropped, strict=True):
        padded = torch.nn.functional.pad(original, (4, 4, 4, 4))
        matches = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(padded[:, dy : dy + 32, dx : dx + 32], out)
        ]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) > 10, "crops should vary between images"


def test_random_flip_flips_about_half():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1000, 3, 32, 32), dtype=torch.uint8, generator=g)
    flipped = random_flip(images, g)
    same = (flipped == images).flatten(1).all(1)
    mirrored = (flipped == images.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 400 < int(mirrored.sum()) < 600


def test_batch_loader_visits_every_image_once_per_epoch(tmp_path):
    pixels = np.broadcast_to(np.arange(10, dtype=np.uint8)[:, None, None, None], (10, 8, 8, 3))
    images = image_array(tmp_path, np.ascontiguousarray(pixels))
    loader = BatchLoader(images, torch.arange(10), np.arange(10), batch_size=4, shuffle=True)
    assert len(loader) == 3
    epochs = [torch.cat([y for _, y in loader]) for _ in range(2)]
    for seen in epochs:
        assert sorted(seen.tolist()) == list(range(10))
    assert epochs[0].tolist() != epochs[1].tolist(), "each epoch reshuffles"
    for x, y in loader:
        assert torch.equal(x[:, 0, 0, 0].long(), y), "labels travel with their images"


def test_validation_split_is_seeded_and_disjoint(data_dir):
    def split(seed):
        dm = build.datamodule(
            composed(f"paths.data={data_dir}", "data.val_size=50", f"seed={seed}")
        )
        dm.setup("fit")
        return dm.rows

    a, b, c = split(0), split(0), split(1)
    assert len(a["val"]) == 50 and len(a["train"]) == 150
    assert np.array_equal(a["val"], b["val"])
    assert not np.array_equal(a["val"], c["val"])
    assert not set(a["val"]) & set(a["train"]) and not set(a["test"]) & set(a["pool"])
    # The recipe's draw since the first release: a permutation of the 200 training images.
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0)).numpy()
    assert np.array_equal(a["val"], order[:50]) and np.array_equal(a["train"], order[50:])


def test_validation_split_larger_than_the_data_is_refused(data_dir):
    dm = build.datamodule(composed(f"paths.data={data_dir}", "data.val_size=500"))
    with pytest.raises(PipelineError, match="data.val_size=500"):
        dm.setup("fit")


def resident_file_pages() -> int:
    """Bytes of files mapped into this process and resident in it (Linux's RssFile)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^RssFile:\s+(\d+) kB", status, re.M)[1]) * 1024


class FilePagesDuringFit(pl.Callback):
    """Resident file-mapped memory when fitting starts, and its largest value after any batch:
    what the memory map of the images holds (the compute's own buffers are anonymous memory)."""

    def on_train_start(self, trainer, module) -> None:
        self.start = self.peak = resident_file_pages()

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.peak = max(self.peak, resident_file_pages())


def test_training_holds_a_batch_in_memory_not_the_data_set(tmp_path, monkeypatch):
    """A data set larger than memory trains: reading every image of a 160 MB array in an epoch
    leaves a bounded part of it mapped in the process, since read pages go back to the page
    cache (without that, the array stays resident: 143 MB of it here)."""
    monkeypatch.chdir(tmp_path)
    write_random(tmp_path / "prepared", train=5800, test=200, size=96)
    size = (tmp_path / "prepared" / "images.npy").stat().st_size
    cfg = composed(
        f"paths.data={tmp_path / 'prepared'}", "model=dense_baseline", "trainer.max_epochs=1",
        "data.val_size=500", "data.image_size=96", "optim.whiten=false",
        "callbacks.progress_bar.refresh_rate=0",
    )  # fmt: skip
    pages = FilePagesDuringFit()
    metrics = train(outputs_under(cfg, tmp_path / "out"), callbacks=(pages,))
    assert metrics["train.epochs"] == 1 and size > 160e6
    grew = pages.peak - pages.start
    assert grew < size / 3, f"{grew / 1e6:.0f} MB of the images stayed mapped"


def test_a_size_the_prepared_data_does_not_have_is_one_line(data_dir):
    dm = build.datamodule(composed(f"paths.data={data_dir}", "data.image_size=48"))
    with pytest.raises(PipelineError) as error:
        dm.setup("fit")
    assert str(error.value) == (
        f"{data_dir} holds cifar10 at 32x32, not data.image_size=48; run `dvc repro prepare` "
        "with that size first"
    )

import os
import pickle

import numpy as np
import pytest
import torch

from cnnpipe import PipelineError
from cnnpipe.cifar import read_class_names, unpickle
from cnnpipe.data import (
    BatchLoader,
    CIFAR10DataModule,
    random_crop,
    random_flip,
    read_batch,
    read_split,
)


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


def test_read_split_and_class_names(data_dir):
    images, labels = read_split(data_dir, "train")
    assert images.shape == (200, 3, 32, 32) and len(labels) == 200
    assert read_split(data_dir, "test")[0].shape == (50, 3, 32, 32)
    assert read_class_names(data_dir)[:2] == ["airplane", "automobile"]


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


def test_batch_loader_visits_every_image_once_per_epoch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 32, 32)
    loader = BatchLoader(images, torch.arange(10), batch_size=4, shuffle=True)
    assert len(loader) == 3
    epochs = [torch.cat([y for _, y in loader]) for _ in range(2)]
    for seen in epochs:
        assert sorted(seen.tolist()) == list(range(10))
    assert epochs[0].tolist() != epochs[1].tolist(), "each epoch reshuffles"
    for x, y in loader:
        assert torch.equal(x[:, 0, 0, 0].long(), y), "labels travel with their images"


def test_validation_split_is_seeded_and_disjoint(data_dir):
    def split(seed):
        dm = CIFAR10DataModule(str(data_dir), 32, val_size=50, crop_padding=4, flip=True, seed=seed)
        dm.setup("fit")
        return dm

    a, b, c = split(0), split(0), split(1)
    assert len(a.val_images) == 50 and len(a.train_images) == 150
    assert torch.equal(a.val_images, b.val_images)
    assert not torch.equal(a.val_images, c.val_images)
    val_rows = {bytes(x.flatten().numpy()) for x in a.val_images}
    assert not val_rows & {bytes(x.flatten().numpy()) for x in a.train_images}


def test_validation_split_larger_than_the_data_is_refused(data_dir):
    dm = CIFAR10DataModule(str(data_dir), 32, val_size=500, crop_padding=4, flip=True, seed=0)
    with pytest.raises(PipelineError, match="data.val_size=500"):
        dm.setup("fit")

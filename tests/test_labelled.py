"""Labelled images (data.extra_train) join the training split of either data choice, and only it:
validation and test stay the same images, and a label written while prepare runs is not lost."""

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from cnnpipe import PipelineError
from cnnpipe.data import preparation
from cnnpipe.data.loader import split_rows
from cnnpipe.data.preparation import prepare
from cnnpipe.data.prepared import Prepared
from tests.helpers import CLASSES, composed, folder_config, make_image_folder


def label(folder, name: str, file: str, seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    (folder / name).mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / name / file)
    return pixels


def splits(prepared, data, seed: int = 0) -> dict[str, set[str]]:
    rows = split_rows(Prepared.open(prepared), data, seed)
    files = Prepared.open(prepared).manifest.files
    return {k: {files[i]["path"] for i in v} for k, v in rows.items() if k != "pool"}


@pytest.fixture
def cifar(tmp_path, archive):
    def data(extra) -> OmegaConf:
        path, md5 = archive
        # 40 of the tiny archive's 200 training images for validation.
        given = {"source": str(path), "md5": md5, "extra_train": extra, "val_size": 40}
        return OmegaConf.merge(composed().data, given)

    return data


def test_labelled_images_only_ever_train_with_cifar10(tmp_path, cifar):
    labelled = tmp_path / "labelled"
    cat = label(labelled, "cat", "a1.png", 1)
    label(labelled, "ship", "b2.png", 2)
    prepare(cifar(None), tmp_path / "without")
    prepare(cifar(str(labelled)), tmp_path / "with")
    before, after = Prepared.open(tmp_path / "without"), Prepared.open(tmp_path / "with")
    n = len(before.manifest.files)
    assert after.manifest.files[:n] == before.manifest.files
    assert np.array_equal(after.images.take(np.arange(n)), before.images.take(np.arange(n)))
    extra = after.manifest.files[n:]
    assert [(f["path"], f["label"], f["split"]) for f in extra] == [
        (f"{labelled}/cat/a1.png", CLASSES.index("cat"), "extra"),
        (f"{labelled}/ship/b2.png", CLASSES.index("ship"), "extra"),
    ]
    assert np.array_equal(after.images.take(np.array([n]))[0], cat)
    data = cifar(str(labelled))
    old, new = splits(tmp_path / "without", data), splits(tmp_path / "with", data)
    assert new["test"] == old["test"] and new["val"] == old["val"]
    assert new["train"] == old["train"] | {f["path"] for f in extra}


def test_labelled_images_only_ever_train_with_a_folder(tmp_path):
    make_image_folder(tmp_path / "source", ["a", "b", "c"], 12)
    labelled = tmp_path / "labelled"
    for i in range(6):
        label(labelled, "b", f"{i}.png", i)
    without = folder_config(tmp_path / "source", "data.extra_train=null").data
    with_labels = folder_config(tmp_path / "source", f"data.extra_train={labelled}").data
    prepare(without, tmp_path / "without")
    prepare(with_labels, tmp_path / "with")
    old, new = splits(tmp_path / "without", without), splits(tmp_path / "with", with_labels)
    added = {f"{labelled}/b/{i}.png" for i in range(6)}
    assert new["test"] == old["test"] and new["val"] == old["val"]
    assert new["train"] == old["train"] | added


def test_a_label_of_a_class_the_data_lacks_is_one_line(tmp_path, cifar):
    labelled = tmp_path / "labelled"
    label(labelled, "unicorn", "x.png", 0)
    with pytest.raises(PipelineError, match=r"labelled has images of unicorn, which the data's"):
        prepare(cifar(str(labelled)), tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists(), "nothing written"


def test_a_label_written_while_prepare_runs_is_not_lost(tmp_path, cifar, monkeypatch):
    labelled = tmp_path / "labelled"
    label(labelled, "cat", "first.png", 1)
    decode = preparation.decode_entries
    late = []

    def decode_then_label(root, entries, *args):
        # A person labels another image while the first ones are being decoded.
        if root == labelled and not late:
            late.append(label(labelled, "dog", "late.png", 2))
        return decode(root, entries, *args)

    monkeypatch.setattr(preparation, "decode_entries", decode_then_label)
    prepare(cifar(str(labelled)), tmp_path / "prepared")
    files = Prepared.open(tmp_path / "prepared").manifest.files
    assert [f["path"] for f in files if f["split"] == "extra"] == [
        f"{labelled}/cat/first.png",
        f"{labelled}/dog/late.png",
    ]

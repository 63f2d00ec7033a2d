import csv
import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from cnnpipe import PipelineError
from cnnpipe.data import CIFAR10DataModule, read_split
from cnnpipe.evaluate import evaluate
from cnnpipe.module import Predictor, load_checkpoint, predict_probs
from cnnpipe.train import HISTORY_KEYS, build_trainer, train, warn_if_bf16_is_emulated
from tests.helpers import composed


@pytest.fixture
def cfg(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    overrides = [
        f"paths.data={data_dir}",
        "trainer.max_epochs=2",
        "loader.batch_size=64",
        "data.val_size=40",
    ]
    return composed(*overrides)


def test_train_writes_checkpoint_history_and_metrics(cfg, capfd):
    metrics = train(cfg)
    out, err = capfd.readouterr()
    assert "Epoch 1: 100%" in out + err, "the progress bar"
    assert "💡" not in out + err and "to estimate number of stepping batches" not in out + err
    module = load_checkpoint(cfg.paths.checkpoint)
    assert sum(p.numel() for p in module.parameters()) == 122_570
    assert module.hparams.class_names[0] == "airplane"
    with open(cfg.paths.history) as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "train/loss", "train/acc", "val/loss", "val/acc", "seconds"}
    assert {k: metrics[k] for k in HISTORY_KEYS} == {k: float(rows[-1][k]) for k in HISTORY_KEYS}
    assert metrics["train/epochs"] == 2
    assert metrics["train/images_per_second"] == pytest.approx(
        160 * 2 / metrics["train/seconds"], rel=0.02
    )
    assert not list(Path(cfg.paths.checkpoint).parent.glob(".*partial*"))


@pytest.mark.parametrize(
    "overrides, network",
    [
        (["model=chapter_cnn_bn"], "ChapterCNNBatchNorm"),
        (["model=resnet9", "model.width=4"], "ResNet9"),
        (["trainer.precision=bf16-mixed", "loader.channels_last=false"], "ChapterCNN"),
    ],
    ids=["batchnorm", "resnet9", "bf16-nchw"],
)
def test_other_configurations_train(tmp_path, data_dir, monkeypatch, overrides, network):
    monkeypatch.chdir(tmp_path)
    base = [f"paths.data={data_dir}", "trainer.max_epochs=1", "data.val_size=40"]
    cfg = composed(*base, *overrides)
    metrics = train(cfg)
    module = load_checkpoint(cfg.paths.checkpoint)
    assert type(module.net).__name__ == network
    # The reported accuracies are the saved network's, recomputed here on both splits.
    data = CIFAR10DataModule(cfg.paths.data, 64, cfg.data.val_size, 0, False, cfg.seed)
    data.setup("fit")
    bf16 = cfg.trainer.precision.startswith("bf16")
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        predicted = module.eval()(data.val_images).argmax(1)
    assert metrics["val/acc"] == pytest.approx((predicted == data.val_labels).float().mean().item())
    images, labels = read_split(Path(cfg.paths.data), "test")
    predictor = Predictor(module, cfg.evaluate.tta_flip)
    predicted = predict_probs(predictor, images, 64).argmax(1)
    assert evaluate(cfg)["test/acc"] == pytest.approx((predicted == labels).float().mean().item())


def test_same_seed_gives_the_same_metrics(cfg):
    first = train(cfg)
    second = train(cfg)
    same = ("train/loss", "train/acc", "val/loss", "val/acc")
    assert {k: first[k] for k in same} == {k: second[k] for k in same}


def test_diverging_run_stops_with_a_clear_error_and_saves_nothing(cfg):
    cfg.optim.lr = 1e30
    # An interrupted bar would otherwise print itself after pytest's summary.
    cfg.callbacks.progress_bar.refresh_rate = 0
    with pytest.raises(
        PipelineError, match=r"training diverged: train/loss is (nan|inf).*optim.lr"
    ):
        train(cfg)
    assert not Path(cfg.paths.checkpoint).exists()
    assert not Path(cfg.paths.resume).exists(), "a diverged run is not resumable"


def test_schedule_with_an_empty_phase_is_refused_in_one_line(cfg):
    cfg.trainer.max_epochs, cfg.loader.batch_size = 1, 40  # 4 steps, warm-up of exactly 1
    with pytest.raises(PipelineError, match="4 training steps with optim.pct_start=0.25"):
        train(cfg)
    assert not Path(cfg.paths.checkpoint).exists()


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize(
    "damage",
    [
        lambda good: good[: len(good) // 2],
        lambda good: good[:5000],
        lambda good: b"",
        lambda good: b"model weights, honestly",
        lambda good: _saved({"state_dict": {}, "note": "another project's checkpoint"}),
        lambda good: pickle.dumps(RunsCode()),
    ],
    ids=["half", "first-5k", "empty", "not-a-checkpoint", "foreign", "pickle-runs-code"],
)
def test_damaged_checkpoints_are_refused_without_running_code(cfg, damage):
    cfg.trainer.max_epochs = 1
    train(cfg)
    path = Path(cfg.paths.checkpoint)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(
        PipelineError, match="is not a cnnpipe checkpoint.*run `dvc repro train`"
    ) as error:
        load_checkpoint(str(path))
    assert "\n" not in str(error.value)
    assert not Path("pwned").exists()


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("native, warned", [(False, True), (True, False)])
def test_emulated_bf16_is_named_before_training(cfg, monkeypatch, capsys, native, warned):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    cfg.trainer.precision = "bf16-mixed"
    warn_if_bf16_is_emulated(cfg)
    assert ("trainer.precision=32-true" in capsys.readouterr().out) == warned
    cfg.trainer.precision = "32-true"
    warn_if_bf16_is_emulated(cfg)
    assert capsys.readouterr().out == ""


def test_a_trainer_argument_is_one_line_in_conf(cfg):
    cfg.trainer.gradient_clip_val = 0.5
    assert build_trainer(cfg, []).gradient_clip_val == 0.5


def test_an_unknown_trainer_argument_is_refused_in_one_line(cfg):
    cfg.trainer.max_epoch = 3
    with pytest.raises(PipelineError) as error:
        train(cfg)
    assert str(error.value) == (
        "trainer.max_epoch is not an argument of pytorch_lightning.Trainer; see its "
        "documentation for the ones there are"
    )

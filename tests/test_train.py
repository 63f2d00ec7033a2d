import csv
import io
import os
import pickle
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cnnpipe import PipelineError
from cnnpipe.data.loader import read_split
from cnnpipe.training import build
from cnnpipe.training.classifier import load_checkpoint, whiten_first_conv
from cnnpipe.training.evaluation import evaluate
from cnnpipe.training.fit import HISTORY_KEYS, train
from cnnpipe.training.inference import TorchModel, nhwc, predict_probs
from cnnpipe.training.models import ChapterCNN, DenseBaseline
from tests.helpers import TINY, composed


@pytest.fixture
def cfg(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return composed(f"paths.data={data_dir}", *TINY)


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
    assert metrics["train.epochs"] == 2
    # train.seconds is rounded to 0.01 s, which is a few percent of a tiny training.
    seconds = metrics["train.seconds"]
    assert metrics["train.images_per_second"] == pytest.approx(
        160 * 2 / seconds, abs=160 * 2 * 0.0051 / seconds**2 + 0.05
    )
    assert not list(Path(cfg.paths.checkpoint).parent.glob(".*partial*"))


class BatchRecorder(pl.Callback):
    """Each training batch's size, correct predictions and loss, by epoch."""

    def __init__(self) -> None:
        self.epochs = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self.epochs.append([])

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        images, labels = batch
        # The weights the step is about to use: the same logits as its forward pass.
        with torch.no_grad():
            correct = (module(images).argmax(1) == labels).sum().item()
        self.epochs[-1].append([len(labels), correct])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.epochs[-1][-1].append(outputs["loss"].item())


@pytest.mark.parametrize("max_steps", [-1, 5], ids=["whole-epochs", "stopped-mid-epoch"])
def test_train_metrics_are_each_epochs_batches_recomputed(cfg, max_steps):
    # 160 training images in batches of 64: 3 steps an epoch; 5 steps end in epoch 2's second.
    cfg.trainer.max_steps = max_steps
    recorder = BatchRecorder()
    train(cfg, callbacks=(recorder,))
    with open(cfg.paths.history) as f:
        rows = list(csv.DictReader(f))
    assert [len(batches) for batches in recorder.epochs] == ([3, 3] if max_steps < 0 else [3, 2])
    for row, batches in zip(rows, recorder.epochs, strict=True):
        images = sum(n for n, _, _ in batches)
        loss = sum(n * loss for n, _, loss in batches) / images
        assert float(row["train/loss"]) == pytest.approx(loss, abs=2e-6)
        correct = sum(c for _, c, _ in batches)
        assert float(row["train/acc"]) == pytest.approx(correct / images, abs=1e-6)


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
    data = build.datamodule(cfg)
    data.setup("fit")
    val = data.rows["val"]
    val_images = torch.from_numpy(data.prepared.images.take(val)).permute(0, 3, 1, 2)
    bf16 = build.precision(cfg).startswith("bf16")
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        predicted = module.eval()(val_images).argmax(1)
    val_labels = data.labels[val]
    assert metrics["val/acc"] == pytest.approx((predicted == val_labels).float().mean().item())
    images, labels = read_split(cfg, "test")
    model = TorchModel(module, **cfg.evaluate.tta)
    predicted = predict_probs(model, nhwc(images), 64).argmax(1)
    assert evaluate(cfg)["test.acc"] == pytest.approx((predicted == labels).float().mean().item())


class OptimiserSeen(pl.Callback):
    def on_train_start(self, trainer, module):
        self.optimizer = trainer.optimizers[0]
        self.schedule = trainer.lr_scheduler_configs[0].scheduler


def test_another_optimiser_is_a_config_file(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = composed(f"paths.data={data_dir}", *TINY, "optim=sgd_onecycle", "optim.lr=0.02")
    seen = OptimiserSeen()
    train(cfg, callbacks=(seen,))
    assert type(seen.optimizer) is torch.optim.SGD
    # As configured; the one-cycle schedule then cycles the momentum itself.
    given = seen.optimizer.defaults
    assert (given["momentum"], given["nesterov"], given["weight_decay"]) == (0.9, True, 0.05)
    # The one-cycle schedule, given the run's step count: 160 images in batches of 64, 2 epochs.
    assert type(seen.schedule) is torch.optim.lr_scheduler.OneCycleLR
    assert seen.schedule.total_steps == 6
    assert seen.schedule.optimizer.param_groups[0]["max_lr"] == 0.02


def test_a_checkpoint_from_before_the_optimiser_nodes_loads(cfg, tmp_path):
    train(cfg)
    checkpoint = torch.load(cfg.paths.checkpoint, weights_only=True)
    for key in ("optimizer", "scheduler"):
        del checkpoint["hyper_parameters"]["optim"][key]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    images, _ = read_split(cfg, "test")
    with torch.inference_mode():
        want = load_checkpoint(cfg.paths.checkpoint).eval()(images)
        assert torch.equal(load_checkpoint(str(old)).eval()(images), want)


def test_same_seed_gives_the_same_metrics(cfg):
    first = train(cfg)
    second = train(cfg)
    same = ("train/loss", "train/acc", "val/loss", "val/acc")
    assert {k: first[k] for k in same} == {k: second[k] for k in same}


def test_diverging_run_stops_with_a_clear_error_and_saves_nothing(cfg, data_dir):
    # Composed, as a user sets it: the optimiser and the schedule take optim.lr from there.
    cfg = OmegaConf.merge(cfg, composed(f"paths.data={data_dir}", *TINY, "optim.lr=1e30"))
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


@pytest.mark.parametrize(
    "avx512_bf16, amx, chosen, used, said",
    [
        (True, False, "auto", "bf16-mixed", "precision: bf16-mixed, as this CPU has native bf16"),
        (False, True, "auto", "bf16-mixed", "precision: bf16-mixed, as this CPU has native bf16"),
        (False, False, "auto", "32-true", ""),  # AVX2, or AVX-512 without BF16: emulated
        (True, False, "32-true", "32-true", ""),
        (False, False, "bf16-mixed", "bf16-mixed", "warning: this CPU has no native bf16"),
    ],
)
def test_precision_follows_the_cpus_bf16(cfg, monkeypatch, capsys, avx512_bf16, amx, chosen,
                                         used, said):  # fmt: skip
    # CI's CPU varies: its capability is faked.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cfg.trainer.accelerator, cfg.trainer.precision = "cpu", chosen
    assert build.announce_precision(cfg) == used
    out = capsys.readouterr().out
    assert out.startswith(said) and out.count("\n") == (1 if said else 0)
    assert build.trainer(cfg, []).precision == used


def test_a_trainer_argument_is_one_line_in_conf(cfg):
    cfg.trainer.gradient_clip_val = 0.5
    assert build.trainer(cfg, []).gradient_clip_val == 0.5


def test_an_unknown_trainer_argument_is_refused_in_one_line(cfg):
    cfg.trainer.max_epoch = 3
    with pytest.raises(PipelineError) as error:
        train(cfg)
    assert str(error.value) == (
        "trainer.max_epoch is not an argument of pytorch_lightning.Trainer; see its "
        "documentation for the ones there are"
    )


class WeightsAfterEachStep(pl.Callback):
    def __init__(self) -> None:
        self.steps = []

    def on_train_batch_end(self, trainer, module, *_) -> None:
        self.steps.append({k: v.detach().clone() for k, v in module.net.state_dict().items()})


def test_the_checkpoint_holds_the_moving_average_of_the_weights(cfg):
    cfg.optim.ema_decay, cfg.optim.ema_every_n_steps = 0.9, 2
    recorder = WeightsAfterEachStep()
    train(cfg, callbacks=(recorder,))
    # AveragedModel starts from the weights after the first step, then decays towards those
    # after every second step: the 3rd and the 5th of the 6 (2 epochs of 3 steps).
    assert len(recorder.steps) == 6
    average = recorder.steps[0]
    for weights in recorder.steps[2::2]:
        average = {k: 0.9 * average[k] + 0.1 * weights[k] for k in average}
    saved = load_checkpoint(cfg.paths.checkpoint).net.state_dict()
    for key, value in average.items():
        torch.testing.assert_close(saved[key], value)
    assert not torch.allclose(saved["conv1.weight"], recorder.steps[-1]["conv1.weight"])


def test_whitened_first_conv_decorrelates_its_input_patches():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    images[:, 1] = images[:, 0] // 2 + images[:, 1] // 2  # correlated channels
    mean = torch.full((1, 3, 1, 1), 120.0)
    std = torch.full((1, 3, 1, 1), 60.0)
    net = ChapterCNN()
    whiten_first_conv(net, images, mean, std)
    with torch.no_grad():
        out = F.conv2d((images.float() - mean) / std, net.conv1.weight)
    features = out.permute(1, 0, 2, 3).flatten(1)
    half = features[:16]
    # +/- pairs, zero bias, and the first half's covariance is the identity but for the eps.
    torch.testing.assert_close(features[16:], -half)
    assert (net.conv1.bias == 0).all()
    patches = F.unfold((images.float() - mean) / std, 3).transpose(1, 2).reshape(-1, 27)
    eigenvalues = torch.linalg.eigvalsh(patches.double().T.cov())[-16:]
    expected = torch.diag(eigenvalues / (eigenvalues + 5e-4)).float()
    torch.testing.assert_close(half.cov(), expected, atol=1e-4, rtol=0)


def test_whitening_leaves_a_network_without_convolutions_alone():
    net = DenseBaseline()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    whiten_first_conv(net, torch.zeros(4, 3, 32, 32, dtype=torch.uint8), 0, 1)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())

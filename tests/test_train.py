import csv
import io
import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from omegaconf import OmegaConf

from cnnpipe import PipelineError, cli, tracking
from cnnpipe.config import compose_params
from cnnpipe.evaluate import evaluate
from cnnpipe.module import load_checkpoint
from cnnpipe.train import interrupted_run, train
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    overrides = [
        f"paths.data={data_dir}",
        "trainer.max_epochs=2",
        "trainer.batch_size=64",
        "data.val_size=40",
    ]
    return OmegaConf.create(compose_params(overrides, conf_dir=ROOT / "conf"))


def test_train_writes_checkpoint_history_and_metrics(cfg):
    metrics = train(cfg)
    module = load_checkpoint(cfg.paths.checkpoint)
    assert sum(p.numel() for p in module.parameters()) == 122_570
    assert module.hparams.class_names[0] == "airplane"
    with open(cfg.paths.history) as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "train/loss", "train/acc", "val/loss", "val/acc", "seconds"}
    assert json.loads(Path(cfg.paths.train_metrics).read_text()) == metrics
    assert metrics["images_per_second"] > 0
    assert not list(Path(cfg.paths.checkpoint).parent.glob(".*partial*"))


def test_pipeline_run_collects_train_and_evaluate(cfg, tmp_path):
    run_file = Path(cfg.paths.run)
    run_id = tracking.start_pipeline_run(cfg, run_file)
    train(cfg, run_id)
    metrics = evaluate(cfg)
    with tracking.pipeline_run(cfg, run_file):
        mlflow.log_metric("test/acc", metrics["test/acc"])

    assert (tmp_path / "mlflow.db").is_file()
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.data.params["trainer.max_epochs"] == "2"
    assert run.data.params["model._target_"] == "cnnpipe.models.ChapterCNN"
    assert {"train/loss", "val/acc", "test/acc"} <= set(run.data.metrics)
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert run.data.tags["mlflow.source.git.commit"]

    assert 0 <= metrics["test/acc"] <= 1
    assert set(metrics["test/per_class_acc"]) == set(
        load_checkpoint(cfg.paths.checkpoint).hparams.class_names
    )
    lines = Path(cfg.paths.confusion_csv).read_text().splitlines()
    assert lines[0] == "actual,predicted" and len(lines) == 51
    assert Path(cfg.paths.confusion_png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "overrides, network",
    [
        (["model=chapter_cnn_bn"], "ChapterCNNBatchNorm"),
        (["model=resnet9", "model.width=4"], "ResNet9"),
        (["trainer.precision=bf16-mixed", "trainer.channels_last=false"], "ChapterCNN"),
    ],
    ids=["batchnorm", "resnet9", "bf16-nchw"],
)
def test_other_configurations_train(tmp_path, data_dir, monkeypatch, overrides, network):
    monkeypatch.chdir(tmp_path)
    base = [f"paths.data={data_dir}", "trainer.max_epochs=1", "data.val_size=40"]
    cfg = OmegaConf.create(compose_params(base + overrides, conf_dir=ROOT / "conf"))
    metrics = train(cfg)
    assert 0 <= metrics["val/acc"] <= 1
    module = load_checkpoint(cfg.paths.checkpoint)
    assert type(module.net).__name__ == network
    assert evaluate(cfg)["test/acc"] >= 0


def test_same_seed_gives_the_same_metrics(cfg):
    first = train(cfg)
    second = train(cfg)
    same = ("train/loss", "train/acc", "val/loss", "val/acc")
    assert {k: first[k] for k in same} == {k: second[k] for k in same}


def test_diverging_run_stops_with_a_clear_error_and_saves_nothing(cfg):
    cfg.optim.lr = 1e30
    # An interrupted bar would otherwise print itself after pytest's summary.
    cfg.trainer.progress_bar_refresh_rate = 0
    with pytest.raises(
        PipelineError, match=r"training diverged: train/loss is (nan|inf).*optim.lr"
    ):
        train(cfg)
    assert not Path(cfg.paths.checkpoint).exists()
    assert not Path(cfg.paths.resume).exists(), "a diverged run is not resumable"


def test_schedule_with_an_empty_phase_is_refused_in_one_line(cfg):
    cfg.trainer.max_epochs, cfg.trainer.batch_size = 1, 40  # 4 steps, warm-up of exactly 1
    with pytest.raises(PipelineError, match="4 training steps with optim.pct_start=0.25"):
        train(cfg)
    assert not Path(cfg.paths.checkpoint).exists()


# Runs the train stage and kills it with SIGKILL in the middle of its third epoch.
KILLED_IN_EPOCH_3 = """
import os, signal, sys
from omegaconf import OmegaConf
from cnnpipe.module import ImageClassifier
from cnnpipe.train import train

step = ImageClassifier.training_step

def step_then_die(self, batch, index):
    if self.current_epoch == 2 and index == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, batch, index)

ImageClassifier.training_step = step_then_die
train(OmegaConf.load(sys.argv[1]), sys.argv[2])
"""


def test_run_killed_mid_training_resumes_from_its_last_checkpoint(cfg, tmp_path, capsys):
    cfg.trainer.max_epochs = 4
    uninterrupted = train(cfg)
    rows = Path(cfg.paths.history).read_text()
    for path in (cfg.paths.checkpoint, cfg.paths.history, cfg.paths.train_metrics):
        Path(path).unlink()

    run_file = Path(cfg.paths.run)
    run_id = tracking.start_pipeline_run(cfg, run_file)
    OmegaConf.save(cfg, tmp_path / "cfg.yaml")
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_IN_EPOCH_3, str(tmp_path / "cfg.yaml"), run_id],
        capture_output=True,
    )
    assert killed.returncode == -signal.SIGKILL
    assert not Path(cfg.paths.checkpoint).exists(), "no half-trained model left as the output"
    assert not Path(cfg.paths.train_metrics).exists()
    client = mlflow.MlflowClient(tracking.tracking_uri())
    assert len(client.get_metric_history(run_id, "val/acc")) == 2, "epochs 1 and 2 were logged"

    other_recipe = OmegaConf.merge(cfg, {"optim": {"lr": 0.001}})
    assert interrupted_run(other_recipe) is None, "another recipe starts afresh"
    state = interrupted_run(cfg)
    assert state["run_id"] == run_id
    assert tracking.start_pipeline_run(cfg, run_file, state["run_id"]) == run_id
    resumed = train(cfg, run_id)

    assert "resuming the interrupted run" in capsys.readouterr().out
    same = ("epoch", "train/loss", "train/acc", "val/loss", "val/acc")
    assert {k: resumed[k] for k in same} == {k: uninterrupted[k] for k in same}
    strip_seconds = [line.rsplit(",", 1)[0] for line in rows.splitlines()]
    resumed_rows = Path(cfg.paths.history).read_text().splitlines()
    assert [line.rsplit(",", 1)[0] for line in resumed_rows] == strip_seconds
    assert not Path(cfg.paths.resume).exists(), "finished runs leave no resume state"
    assert len(client.get_metric_history(run_id, "val/acc")) == 4, "the same run goes on"


def test_unreachable_store_stops_training_before_it_starts(cfg, monkeypatch):
    OmegaConf.save(cfg, "params.yaml")
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(SystemExit, match=f"cnnpipe train: error: MLflow store {uri} failed"):
        cli.main(["train"])
    assert not Path(cfg.paths.checkpoint).exists() and not Path(cfg.paths.resume).exists()


def test_locked_sqlite_store_is_named_after_mlflows_wait(cfg, tmp_path):
    OmegaConf.save(cfg, "params.yaml")
    mlflow.MlflowClient(tracking.tracking_uri()).search_experiments()
    lock = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    with pytest.raises(SystemExit, match="database is locked.*stop the process locking") as exit:
        cli.main(["train"])
    lock.close()
    assert "\n" not in str(exit.value)
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

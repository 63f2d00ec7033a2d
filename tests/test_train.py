import csv
import json
from pathlib import Path

import mlflow
import pytest
from omegaconf import OmegaConf

from cnnpipe import PipelineError, tracking
from cnnpipe.config import compose_params
from cnnpipe.evaluate import evaluate
from cnnpipe.module import load_checkpoint
from cnnpipe.train import train

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

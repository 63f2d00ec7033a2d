"""Experiments at scale on one machine, for real on tiny data: Hydra sweeps (one process and
joblib's parallel workers), `cnnpipe runs`, the SLURM launcher's config, DDP with 2 CPU
processes. On a SLURM cluster and a team server: test_cluster.py."""

import functools
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir

from cnnpipe.base.config import compose_params
from tests import helpers
from tests.helpers import ROOT, compose_for, trained_params

# Every command these tests run must succeed.
cnnpipe = functools.partial(helpers.cnnpipe, check=True)

BIN = Path(sys.executable).parent


def sweep_runs(repo: Path) -> tuple[mlflow.entities.Run, list[mlflow.entities.Run]]:
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnnpipe").experiment_id])
    (parent,) = [r for r in runs if "sweep.dir" in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 1 + len(children), "every run belongs to the sweep"
    return parent, children


@pytest.mark.slow
def test_grid_sweep_gives_one_parent_four_children_and_a_summary(project):
    repo, tiny = project
    out = cnnpipe(
        "train", "--multirun", "optim.lr=1e-3,3e-3", "model=chapter_cnn,chapter_cnn_bn", *tiny
    ).stdout

    parent, children = sweep_runs(repo)
    grid = {
        (c.data.params["optim.lr"], c.data.params["model._target_"].rsplit(".", 1)[1])
        for c in children
    }
    assert grid == {
        (lr, net) for lr in ("0.001", "0.003") for net in ("ChapterCNN", "ChapterCNNBatchNorm")
    }
    for child in children:
        assert {"val/acc", "test.acc", "train/loss"} <= set(child.data.metrics)
        assert child.data.tags["sweep.overrides"].startswith("optim.lr=")
        assert child.info.status == "FINISHED"
    assert parent.info.status == "FINISHED"
    best = max(children, key=lambda c: c.data.metrics["val/acc"])
    assert parent.data.metrics["best/val/acc"] == best.data.metrics["val/acc"]
    assert [c.info.run_id for c in children if c.data.tags.get("sweep.best")] == [best.info.run_id]
    assert parent.data.tags["sweep.best_run"] == best.info.run_id
    # The parent: the shared recipe as params, what varies, a source; its summary links the runs.
    assert parent.data.params["sweep.varied"] == "optim.lr, model"
    assert parent.data.params["trainer.max_epochs"] == "2"
    assert not [k for k in parent.data.params if k.startswith(("optim.lr", "model."))]
    assert parent.data.tags["mlflow.source.name"] == "cnnpipe train --multirun"
    for c in children:
        run = f"#/experiments/{c.info.experiment_id}/runs/{c.info.run_id}"
        link = f"[{c.info.run_id}]({run}?workflowType=machine_learning)"
        assert link in parent.data.tags["mlflow.note.content"]

    rows = re.findall(r"^\| (optim\.lr=\S+ model=\S+) \| ([\d.]+) \| ([\d.]+) \|", out, re.M)
    assert len(rows) == 4
    by_overrides = {" ".join(c.data.tags["sweep.overrides"].split()[:2]): c for c in children}
    for overrides, val, test in rows:
        child = by_overrides[overrides]
        assert float(val) == pytest.approx(child.data.metrics["val/acc"], abs=1e-4)
        assert float(test) == pytest.approx(child.data.metrics["test.acc"], abs=1e-4)
    assert [float(v) for _, v, _ in rows] == sorted((float(v) for _, v, _ in rows), reverse=True)
    artifact = mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/sweep_summary.md")
    assert artifact.count("| optim.lr=") == 4 and artifact.count("](#/experiments/") == 4

    # Each job wrote into its own folder under sweeps/; nothing DVC tracks was touched.
    assert not (repo / "models").exists() and not (repo / "metrics").exists()
    (sweep,) = (repo / "sweeps").iterdir()
    assert sorted(p.name for p in sweep.glob("*/models/model.ckpt")) == ["model.ckpt"] * 4

    table = cnnpipe("runs", "--sweep", "latest").stdout.splitlines()
    assert table[0].split()[:3] == ["run", "started", "status"]
    assert sorted(line.split()[0] for line in table[1:]) == sorted(
        c.info.run_id[:8] for c in children
    )
    assert len(cnnpipe("runs", "--last", "2").stdout.splitlines()) == 3


@pytest.mark.slow
def test_parallel_sweep_on_sqlite_loses_nothing(project):
    repo, tiny = project
    started = repo / "started"
    # Each training waits at its start for the other one (tests/helpers.py): the two jobs must
    # overlap, however slow the machine is to start the second worker.
    cnnpipe(
        "train", "--multirun", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        "optim.lr=1e-3,3e-3", *tiny,
        "+callbacks.rendezvous._target_=tests.helpers.Rendezvous",
        f"+callbacks.rendezvous.folder={started}",
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    parent, children = sweep_runs(repo)
    assert len(children) == 2
    assert len(list(started.iterdir())) == 2, "trainings in two processes at once"
    first, second = sorted(children, key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time, "the two jobs ran at the same time"
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    for child in children:
        assert child.info.status == "FINISHED"
        assert trained_params(compose_for(child)) == child.data.params, "no param lost"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val/acc")] == [1, 2]
        assert {"test.acc", "train.seconds"} <= set(child.data.metrics)


@pytest.mark.slow
def test_a_failed_job_fails_the_sweep_in_one_line_and_closes_its_parent(project):
    repo, tiny = project
    result = subprocess.run(
        [str(BIN / "cnnpipe"), "train", "--multirun", "optim.lr=1e-3,-1", *tiny],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 1
    assert "cnnpipe train: error: optim.lr=-1.0 must be > 0\n" in result.stderr
    assert "Traceback" not in result.stderr
    parent, children = sweep_runs(repo)
    assert parent.info.status == "FAILED"
    assert [c.data.params["optim.lr"] for c in children] == ["0.001"], "the good job still ran"


def test_slurm_launcher_config_composes():
    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=gpu"]
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1
    assert launcher.tasks_per_node == 1 and launcher.timeout_min == 60
    assert cfg.hydra.callbacks.parent_run._target_ == "cnnpipe.experiments.sweep.ParentRun"


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(project):
    """`dvc exp run -S trainer=ddp` on this machine: Lightning starts the second process itself.
    (SLURM starting both: test_cluster.py.)"""
    repo, tiny = project
    digest = "+callbacks.digest._target_=tests.helpers.WeightsDigest"
    ddp = ["trainer=ddp", "trainer.max_epochs=2", "loader.batch_size=32", digest]
    (repo / "params.yaml").write_text(compose_params([*tiny, *ddp], conf_dir=repo / "conf"))
    result = cnnpipe("train")
    ranks = helpers.ranks(result.stdout)
    assert set(ranks) == {"0", "1"}, result.stdout[-2000:]
    assert ranks["0"] == ranks["1"], "both ranks end with the same weights"
    world, batches, digest = ranks["0"]
    # 160 training images: 80 per rank, in 3 batches of 32.
    assert world == "2" and batches == "3"

    from cnnpipe.training.classifier import load_checkpoint

    module = load_checkpoint("models/model.ckpt")
    weights = b"".join(p.detach().numpy().tobytes() for p in module.parameters())
    assert hashlib.sha256(weights).hexdigest() == digest, "rank 0 saved the trained weights"
    assert result.stdout.count("trained: val/acc") == 1
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("cnnpipe").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["trainer.strategy"] == "ddp"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [1, 2]
    assert not list(repo.rglob("*.partial*")) and not (repo / ".resume" / "train").exists()

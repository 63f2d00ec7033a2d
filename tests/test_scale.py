"""Experiments at scale, for real on tiny data: Hydra sweeps (one process and joblib's parallel
workers), `cnnpipe runs`, the SLURM launcher's config, DDP with 2 CPU processes, and an
`mlflow server` read back over REST."""

import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir

from cnnpipe.config import compose_params
from cnnpipe.tracking import recipe_params
from tests import helpers
from tests.helpers import ROOT, free_port

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
        assert {"val/acc", "test/acc", "train/loss"} <= set(child.data.metrics)
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
        link = f"[{c.info.run_id}](#/experiments/{c.info.experiment_id}/runs/{c.info.run_id})"
        assert link in parent.data.tags["mlflow.note.content"]

    rows = re.findall(r"^\| (optim\.lr=\S+ model=\S+) \| ([\d.]+) \| ([\d.]+) \|", out, re.M)
    assert len(rows) == 4
    by_overrides = {" ".join(c.data.tags["sweep.overrides"].split()[:2]): c for c in children}
    for overrides, val, test in rows:
        child = by_overrides[overrides]
        assert float(val) == pytest.approx(child.data.metrics["val/acc"], abs=1e-4)
        assert float(test) == pytest.approx(child.data.metrics["test/acc"], abs=1e-4)
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
        assert recipe_params(compose_for(child)) == child.data.params, "no param lost"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val/acc")] == [1, 2]
        assert {"test/acc", "train/seconds"} <= set(child.data.metrics)


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


def compose_for(run: mlflow.entities.Run):
    """The composed config that a child run's params must mirror key for key."""
    from omegaconf import OmegaConf

    overrides = run.data.tags["sweep.overrides"].split()
    return OmegaConf.create(compose_params(overrides, conf_dir=Path("conf")))


def test_slurm_launcher_config_composes():
    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=gpu"]
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1
    assert launcher.tasks_per_node == 1 and launcher.timeout_min == 60
    assert cfg.hydra.callbacks.parent_run._target_ == "cnnpipe.experiments.sweep.ParentRun"


# Runs the train stage under torchrun, then prints this rank's weights digest and shard size.
DDP_JOB = """
import hashlib
import cnnpipe.trainer
from cnnpipe.stages import train
from pytorch_lightning.utilities import rank_zero_only

trainers = []
build = cnnpipe.trainer.build_trainer
cnnpipe.trainer.build_trainer = lambda *a, **k: trainers.append(build(*a, **k)) or trainers[-1]
train.main([])
trainer = trainers[0]
weights = b"".join(p.detach().numpy().tobytes() for p in trainer.lightning_module.parameters())
digest = hashlib.sha256(weights).hexdigest()
print(f"RANK {rank_zero_only.rank} {trainer.world_size} {trainer.num_training_batches} {digest}")
"""


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(project):
    repo, tiny = project
    ddp = ["trainer=ddp", "trainer.max_epochs=2", "loader.batch_size=32"]
    params = compose_params([*tiny, *ddp], conf_dir=repo / "conf")
    (repo / "params.yaml").write_text(params)
    (repo / "ddp_job.py").write_text(DDP_JOB)
    result = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "ddp_job.py"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = dict(
        (rank, rest) for rank, *rest in (line.split()[1:] for line in result.stdout.splitlines()
                                        if line.startswith("RANK "))
    )  # fmt: skip
    assert set(ranks) == {"0", "1"}
    assert ranks["0"] == ranks["1"], "both ranks end with the same weights"
    world, batches, digest = ranks["0"]
    # 160 training images: 80 per rank, in 3 batches of 32.
    assert world == "2" and batches == "3"

    from cnnpipe.training import load_checkpoint

    module = load_checkpoint("models/model.ckpt")
    weights = b"".join(p.detach().numpy().tobytes() for p in module.parameters())
    assert hashlib.sha256(weights).hexdigest() == digest, "rank 0 saved the trained weights"
    assert "trained: val/acc" in result.stdout
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("cnnpipe").experiment_id])
    assert run.data.params["trainer.strategy"] == "ddp"
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2, "logged once"
    assert not list(repo.rglob("*.partial*")) and not (repo / ".resume" / "train").exists()

    # Without torchrun, as `dvc repro` runs it, Lightning starts the second process itself.
    cnnpipe("train")
    assert len(client.search_runs([run.info.experiment_id])) == 2, "one more run, not two"


def rest(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_mlflow_server_serves_the_stores_runs_over_rest(project):
    repo, tiny = project
    cnnpipe("train")
    run_id = json.loads((repo / "models" / "mlflow_run.json").read_text())["run_id"]
    store = f"sqlite:///{repo / 'mlflow.db'}"
    client = mlflow.MlflowClient(store)
    client.create_registered_model("cnnpipe-cifar10")
    client.create_model_version("cnnpipe-cifar10", f"runs:/{run_id}/plots", run_id)

    port, artifacts = free_port(), repo / "server-artifacts"
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", store, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--artifacts-destination", str(artifacts)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer /health within a minute")
        experiment = rest(base, "experiments/get-by-name?experiment_name=cnnpipe")["experiment"]
        runs = rest(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        assert [r["info"]["run_id"] for r in runs] == [run_id]
        params = {p["key"]: p["value"] for p in runs[0]["data"]["params"]}
        assert params["trainer.max_epochs"] == "2"
        history = rest(base, f"metrics/get-history?run_id={run_id}&metric_key=val/acc")
        expected = client.get_metric_history(run_id, "val/acc")
        assert [m["value"] for m in history["metrics"]] == [m.value for m in expected]
        model = rest(base, "registered-models/get?name=cnnpipe-cifar10")["registered_model"]
        assert model["latest_versions"][0]["run_id"] == run_id

        # A team's setup: the stage logs through the server, which keeps the artifacts.
        params = compose_params([*tiny, "mlflow.experiment=team"], conf_dir=repo / "conf")
        (repo / "params.yaml").write_text(params)
        cnnpipe("train", env={**os.environ, "MLFLOW_TRACKING_URI": base})
        team_id = json.loads((repo / "models" / "mlflow_run.json").read_text())["run_id"]
        team = rest(base, f"runs/get?run_id={team_id}")["run"]
        assert {m["key"] for m in team["data"]["metrics"]} >= {"val/acc", "train/loss"}
        assert list(artifacts.rglob("train_history.csv")), "artifacts stored by the server"
    finally:
        server.terminate()
        server.wait(timeout=30)

"""Beyond one machine, for real: a one-node SLURM cluster and a PostgreSQL server started by
tools/local_cluster.py (the `cluster` fixture), a team's `mlflow server` on PostgreSQL, and the
journeys of docs/scale-out.md through them on tiny data."""

import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import boto3
import botocore.exceptions
import mlflow
import numpy as np
import optuna
import pytest
import yaml
from sqlalchemy.exc import SQLAlchemyError

from cnnpipe.base.localhost import free_port, wait_for_http, wait_until
from cnnpipe.serving.onnx_model import OnnxModel
from cnnpipe.tracking.probe import SERVER_LOG
from cnnpipe.tracking.stage_run import ERROR
from cnnpipe.tracking.store import ui_link
from cnnpipe.training.fit import HISTORY_KEYS
from tests import helpers
from tests.helpers import (
    ROOT,
    SEARCH,
    compose_for,
    copy_repo,
    fault_lines,
    make_archive,
    repo_env,
    store,
    trained_params,
)
from tests.mlflow_ui import artifact_as_a_newcomer
from tools.local_cluster import BUCKET

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
cnnpipe = functools.partial(helpers.cnnpipe, check=True)


def slurm(cluster, *command: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """A SLURM command (srun, sbatch, squeue, ...) on the local cluster; it must succeed."""
    env = {**os.environ, **cluster.env, "PYTHONPATH": str(ROOT), **kwargs.pop("env", {})}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, **kwargs
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_ddp_through_srun_trains_two_ranks_into_one_run(cluster, project):
    repo, tiny = project
    digest = "+callbacks.digest._target_=tests.helpers.WeightsDigest"
    cnnpipe("params", *tiny, "trainer=ddp", "loader.batch_size=32", digest)
    # docs/scale-out.md's command, with the CPUs of this one node.
    srun = ["srun", "--ntasks-per-node=2", "--cpus-per-task=1", str(BIN / "cnnpipe"), "train"]
    result = slurm(cluster, *srun)

    by_rank = helpers.ranks(result.stdout)
    assert set(by_rank) == {"0", "1"}, result.stdout[-2000:]
    assert by_rank["0"] == by_rank["1"], "both ranks end with the same weights"
    world, batches, _ = by_rank["0"]
    # 160 training images: 80 per rank, in 3 batches of 32.
    assert (world, batches) == ("2", "3")
    assert result.stdout.count("trained: val/acc") == 1
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("cnnpipe").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.strategy"] == "ddp"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [1, 2]


def test_an_srun_line_lightning_refuses_gets_one_line(cluster, project):
    cnnpipe("params", *project[1], "trainer=ddp")
    env = {**os.environ, **cluster.env}
    result = subprocess.run(
        ["srun", "--ntasks=2", str(BIN / "cnnpipe"), "train"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    says = "cnnpipe train: error: SLURM: You set `--ntasks=2` in your SLURM bash script"
    assert says in result.stderr


@pytest.fixture(scope="module")
def team_server(cluster, tmp_path_factory):
    """`mlflow server` as docs/scale-out.md runs it for a team: runs and the registry in
    PostgreSQL, artifacts in the cluster's S3 bucket. Only the server has the bucket's
    credentials: clients send and fetch artifacts through it."""
    commands = docs_commands("A shared MLflow server")
    pg, port = str(cluster.state["pg_port"]), free_port()
    created = [line for line in commands if line.startswith("createdb")]
    assert [line.split()[-1] for line in created] == ["mlflow", "optuna"]
    for line in created:
        subprocess.run(shlex.split(line.replace("PORT", pg)), check=True, capture_output=True)
    (line,) = [line for line in commands if line.startswith("mlflow server")]
    line = line.replace("127.0.0.1:PORT", f"127.0.0.1:{pg}").replace("5000", str(port))
    assert f"s3://{BUCKET}/mlflow" in line
    log = tmp_path_factory.mktemp("mlflow-server") / "mlflow-server.log"
    with open(log, "w") as output:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), *shlex.split(line)[1:]],
            stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **cluster.s3_env},
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/health", server, "mlflow server", deadline_s=180)
    except (RuntimeError, TimeoutError) as error:
        server.kill()
        pytest.fail(f"{error}\n{log.read_text()[-2000:]}")
    yield base
    server.terminate()
    server.wait(timeout=60)


def docs_commands(section: str) -> list[str]:
    """The command lines of the first bash block under `## section` in docs/scale-out.md, as
    a reader copies them: continued lines joined, comments dropped."""
    text = (ROOT / "docs" / "scale-out.md").read_text().split(f"\n## {section}\n")[1]
    block = text.split("\n## ")[0].split("```bash\n")[1].split("```")[0]
    lines = [re.sub(r"(^|\s+)#.*$", "", line) for line in block.replace("\\\n", " ").split("\n")]
    return [" ".join(line.split()) for line in lines if line.strip()]


def bucket_objects(cluster, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix` in the cluster's bucket, read back with boto3."""
    client = cluster.s3_client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {key: client.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in keys}


def experiment_runs(uri: str, name: str) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(name).experiment_id])


def test_a_slurm_sweep_runs_its_jobs_at_once_and_logs_everything_to_the_team_server(
    cluster, team_server, project, record_property
):
    repo, tiny = project
    base = team_server
    env = {**cluster.env, "MLFLOW_TRACKING_URI": base}
    started = repo / "started"
    grid = ["optim.lr=1e-3,3e-3", *tiny]
    begin = time.monotonic()
    out = cnnpipe(
        "train", "--multirun", "hydra/launcher=slurm_local", *grid,
        "mlflow.experiment=slurm-sweep",
        # Each training waits at its start for the other: the two SLURM jobs must overlap.
        "+callbacks.rendezvous._target_=tests.helpers.Rendezvous",
        f"+callbacks.rendezvous.folder={started}",
        env=env,
    ).stdout  # fmt: skip
    on_slurm = time.monotonic() - begin

    runs = experiment_runs(base, "slurm-sweep")
    (parent,) = [r for r in runs if "sweep.dir" in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    assert parent.info.status == "FINISHED"
    assert len(list(started.iterdir())) == 2, "two trainings at once"
    first, second = sorted(children, key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time, "the two jobs ran at the same time"
    client = mlflow.MlflowClient(base)
    for child in children:
        assert child.info.status == "FINISHED"
        assert trained_params(compose_for(child)) == child.data.params, "no param lost"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val/acc")] == [1, 2]
        assert {"test.acc", "train.seconds", "train/loss"} <= set(child.data.metrics)
        assert child.data.tags["sweep.overrides"].startswith("optim.lr=")
    histories = [k for k in bucket_objects(cluster, "mlflow/") if k.endswith("train_history.csv")]
    assert len(histories) == 2, "artifacts kept by the server in the bucket"
    rows = re.findall(r"^\| optim\.lr=\S+ \| ([\d.]+) \|", out, re.M)
    assert sorted(float(v) for v in rows) == sorted(
        round(c.data.metrics["val/acc"], 4) for c in children
    )
    # Two SLURM jobs of one array, each with its log in the sweep's .submitit folder.
    (sweep,) = (repo / "sweeps").iterdir()
    logs = sorted(p.name for p in sweep.glob(".submitit/*/*_log.out"))
    assert len(logs) == 2 and re.fullmatch(r"\d+_0_0_log\.out", logs[0]), logs

    # The same grid in turn on this machine's default launcher, for the wall time beside it.
    begin = time.monotonic()
    cnnpipe("train", "--multirun", *grid, "mlflow.experiment=in-turn", env=env)
    in_turn = time.monotonic() - begin
    record_property(
        "figure", f"2-job grid sweep: {on_slurm:.1f} s through SLURM, {in_turn:.1f} s in turn"
    )


def job_state(cluster, job: str) -> dict[str, str]:
    """`scontrol show job`'s fields (JobState, Restarts, ...)."""
    return dict(re.findall(r"(\w+)=(\S*)", slurm(cluster, "scontrol", "show", "job", job).stdout))


def test_a_requeued_slurm_job_resumes_from_its_last_epoch_in_the_same_run(cluster, project):
    repo, tiny = project
    recipe = [*tiny, "trainer.max_epochs=3"]
    cnnpipe("params", *recipe)
    cnnpipe("train")
    uninterrupted = json.loads((repo / "metrics" / "train.json").read_text())
    rows = (repo / "plots" / "train_history.csv").read_text()
    for output in ("models", "metrics", "plots"):
        shutil.rmtree(repo / output)

    # The same recipe as a batch job that holds at the start of epoch 2 until it is stopped.
    held = repo / "held"
    hold = ["+callbacks.hold._target_=tests.helpers.HoldOnce", f"+callbacks.hold.folder={held}"]
    cnnpipe("params", *recipe, *hold)
    path = {"PATH": f"{BIN}:{os.environ['PATH']}"}
    job = slurm(
        cluster, "sbatch", "--parsable", str(ROOT / "slurm" / "train.sbatch"), cwd=repo, env=path
    ).stdout.strip()
    log = repo / f"slurm-{job}.out"
    wait_until("epoch 2 started", (held / "held").exists, 300)
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cnnpipe").experiment_id
    (run,) = [r for r in client.search_runs([experiment]) if r.info.status == "RUNNING"]

    # What SLURM sends before the time limit (--signal=USR1@90) or a preemption.
    slurm(cluster, "scancel", "--signal=USR1", job)
    wait_until("requeued", lambda: job_state(cluster, job)["JobState"] == "PENDING", 300)
    assert job_state(cluster, job)["Restarts"] == "1"
    assert client.get_run(run.info.run_id).info.status != "FINISHED", "not finished yet"
    # SLURM holds a requeued job for two minutes; this test need not wait for that.
    slurm(cluster, "scontrol", "update", f"JobId={job}", "StartTime=now")
    wait_until("the job's end", lambda: job_state(cluster, job)["JobState"] not in
               ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"), 300)  # fmt: skip
    assert job_state(cluster, job)["JobState"] == "COMPLETED", log.read_text()[-3000:]

    text = log.read_text()
    assert "Requeued SLURM job" in text or "requeue" in text.lower()
    assert "resuming the interrupted run from .resume/train/checkpoint/last.ckpt" in text
    runs = client.search_runs([experiment])
    assert len(runs) == 2, "the reference run and one run for the job, requeue and all"
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [1, 2, 3]
    resumed = json.loads((repo / "metrics" / "train.json").read_text())
    assert {k: resumed[k] for k in HISTORY_KEYS} == {k: uninterrupted[k] for k in HISTORY_KEYS}
    without_seconds = [line.rsplit(",", 1)[0] for line in rows.splitlines()]
    resumed_rows = (repo / "plots" / "train_history.csv").read_text().splitlines()
    assert [line.rsplit(",", 1)[0] for line in resumed_rows] == without_seconds
    assert not (repo / ".resume" / "train").exists() and not list(repo.rglob("hpc_ckpt*"))


def test_a_search_on_slurm_shares_a_postgresql_study_and_continues_after_a_kill(
    cluster, team_server, project, record_property
):
    repo, tiny = project
    base = team_server
    storage = f"{cluster.postgres_url}/optuna"  # made by the docs' createdb (team_server)
    env = {**cluster.env, "MLFLOW_TRACKING_URI": base}
    started = repo / "started"
    args = [
        *SEARCH, *tiny, "hydra/launcher=slurm_local", "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=4", f"hydra.sweeper.storage='{storage}'",
        "mlflow.experiment=slurm-search",
        "+callbacks.rendezvous._target_=tests.helpers.Rendezvous",
        f"+callbacks.rendezvous.folder={started}",
    ]  # fmt: skip

    def study() -> optuna.Study:
        return optuna.load_study(study_name="test", storage=storage)

    def completed() -> int:
        try:
            return len(study().get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
        except (KeyError, SQLAlchemyError):
            return 0  # the search has not made its study yet

    first = helpers.cnnpipe("train", "--multirun", *args, env=env, background=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_until("two trials", lambda: completed() >= 2 or first.poll() is not None, 300)
        assert first.poll() is None, "the search was still running"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    # The search is gone; so are the jobs it had submitted (its allocation, say).
    slurm(cluster, "scancel", "--user=root")
    wait_until("no jobs left", lambda: not slurm(cluster, "squeue", "-h").stdout.strip(), 300)
    before = {t.number: t.params for t in study().trials if t.state.is_finished()}

    cnnpipe("train", "--multirun", *args, env=env)

    trials = study().trials
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4
    assert len({tuple(sorted(t.params.items())) for t in done}) == 4, "no trial twice"
    for number, params in before.items():
        assert trials[number].params == params, "finished trials were kept as they were"
    assert len(list(started.iterdir())) >= 2, "two trials at once"
    runs = experiment_runs(base, "slurm-search")
    (parent,) = [r for r in runs if "sweep.dir" in r.data.tags]
    assert parent.info.status == "FINISHED", "the same parent run, continued and closed"
    children = {
        int(r.data.tags["optuna.trial"]): r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    for t in done:
        assert children[t.number].info.status == "FINISHED"
        assert children[t.number].data.metrics["val/acc"] == t.value
    record_property(
        "figure",
        f"search on SLURM and PostgreSQL: {len(before)} trials finished before the kill, "
        f"{len(done)} complete of {len(trials)} after the rerun",
    )


@dataclass
class TeamPipeline:
    """A copy of the repository whose `dvc repro parity` logged to the team server."""

    repo: Path
    env: dict[str, str]
    said: str  # what that `dvc repro` printed

    def run(self, *command: str, cwd: Path | None = None, ok: bool = True, **env: str):
        result = subprocess.run(command, cwd=cwd or self.repo, env={**self.env, **env},
                                capture_output=True, text=True, timeout=900)  # fmt: skip
        if ok:
            assert result.returncode == 0, (
                f"{command}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
            )
        return result


TEAM_TINY = ["data.val_size=40", "trainer.max_epochs=1", "loader.batch_size=64",
             "evaluate.batch_size=16", "mlflow.experiment=team-pipeline"]  # fmt: skip


@pytest.fixture(scope="module")
def team_pipeline(team_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("team")
    (tmp / "www").mkdir()
    md5 = make_archive(tmp / "www" / "cifar-10-python.tar.gz")
    repo = tmp / "repo"
    copy_repo(repo)
    with helpers.folder_over_http(tmp / "www") as www:
        (repo / "conf" / "local" / "data").mkdir(parents=True)
        (repo / "conf" / "local" / "data" / "cifar10.yaml").write_text(
            f"source: {www}/cifar-10-python.tar.gz\nmd5: {md5}\n"
        )
        # No bucket credentials here: the clients reach the bucket through the server.
        pipeline = TeamPipeline(repo, {**repo_env(repo), "MLFLOW_TRACKING_URI": team_server}, "")
        pipeline.run("cnnpipe", "params", *TEAM_TINY)
        for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "pipeline"]):
            pipeline.run("git", *command)
        # The stages that log, register and promote the model; the rest log the same way.
        pipeline.said = pipeline.run("dvc", "repro", "promote").stdout
        yield pipeline


def artifact_files(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    """The paths of a run's artifact files, as the server lists them."""
    files = []
    for info in client.list_artifacts(run_id, path):
        files += artifact_files(client, run_id, info.path) if info.is_dir else [info.path]
    return files


def locked_outputs(repo: Path) -> dict[str, bytes]:
    """Every file of the outputs dvc.lock records, by path."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    paths = {out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])}
    files = {}
    for path in sorted(paths):
        where = repo / path
        for file in [where] if where.is_file() else sorted(where.rglob("*")):
            if file.is_file():
                files[str(file.relative_to(repo))] = file.read_bytes()
    return files


def test_the_pipeline_logs_registers_and_serves_through_the_team_server(
    team_server, team_pipeline, cluster
):
    base, repo = team_server, team_pipeline.repo
    client = mlflow.MlflowClient(base)
    (pipeline,) = experiment_runs(base, "team-pipeline")
    assert pipeline.info.status == "FINISHED"
    test_acc = json.loads((repo / "metrics" / "eval.json").read_text())["test.acc"]
    assert pipeline.data.metrics["test.acc"] == test_acc
    # Each stage ended with the link to its run on the server, in Model training views.
    link = ui_link(pipeline.info.experiment_id, pipeline.info.run_id, base)
    # train, evaluate, export, parity, promote
    assert team_pipeline.said.count(f"MLflow: {link}\n") == 5
    # And no link of MLflow's own: they open in its GenAI views, on an empty traces page.
    assert "View run" not in team_pipeline.said and "View experiment" not in team_pipeline.said

    # The artifacts lie in the bucket, byte for byte what the stages wrote.
    stored = bucket_objects(cluster, "mlflow/")
    run_prefix = f"mlflow/{pipeline.info.experiment_id}/{pipeline.info.run_id}/artifacts/"
    assert (
        stored[run_prefix + "plots/train_history.csv"]
        == (repo / "plots" / "train_history.csv").read_bytes()
    )
    listed = artifact_files(client, pipeline.info.run_id)
    assert {"plots/train_history.csv", "lineage/params.yaml", "lineage/dvc.lock"} <= set(listed)
    assert {run_prefix + path for path in listed} <= set(stored), "all of them in the bucket"
    name = "cnnpipe-cifar10"
    first = client.get_model_version_by_alias(name, "champion")
    assert first.run_id == pipeline.info.run_id
    # The registered version's source is its logged model (models:/m-...), kept in the bucket.
    model = first.source.removeprefix("models:/")
    model_key = f"mlflow/{pipeline.info.experiment_id}/models/{model}/artifacts/model.onnx"
    assert model_key in stored, (first.source, sorted(stored))
    assert stored[model_key] == (repo / "models" / "model.onnx").read_bytes()

    # Parity again (another batch size): a new version that scores as the first is only
    # @challenger; a tie never moves @champion.
    team_pipeline.run("cnnpipe", "params", *TEAM_TINY, "parity.batch_size=25")
    team_pipeline.run("dvc", "repro", "promote")
    challenger = client.get_model_version_by_alias(name, "challenger")
    assert int(challenger.version) == int(first.version) + 1 and challenger.run_id == first.run_id
    assert challenger.tags["promotion.p_value"] == "1.0"
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == first.version

    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "cnnpipe"), "serve", f"models:/{name}@champion", "--port", str(port)],
        cwd=repo, env=team_pipeline.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health/ready", server, "cnnpipe serve")
        with urllib.request.urlopen(f"{url}/metadata", timeout=30) as response:
            model = json.loads(response.read())["model"]
        assert (model["name"], model["version"], model["alias"]) == (
            name, champion.version, "champion"
        )  # fmt: skip
        images = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
        tensor = {"name": "images", "shape": [2, 32, 32, 3], "datatype": "UINT8"}
        body = json.dumps({"inputs": [{**tensor, "data": images.reshape(-1).tolist()}]})
        request = urllib.request.Request(
            f"{url}/v2/models/{name}/infer", body.encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            (output,) = json.loads(response.read())["outputs"]
        want = OnnxModel.load(repo / "models" / "model.onnx").probabilities(images)
        np.testing.assert_allclose(np.reshape(output["data"], (2, -1)), want, atol=1e-6)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    table = team_pipeline.run("cnnpipe", "runs", "--last", "5").stdout.splitlines()
    assert table[0].split()[:3] == ["run", "started", "status"]
    assert any(line.startswith(pipeline.info.run_id[:8]) for line in table[1:]), table


def test_runs_made_locally_are_shared_with_the_team_server_without_retraining(
    team_server, cluster, project, monkeypatch, capsys
):
    """docs/scale-out.md's first step for a team: `make run` locally, then `cnnpipe share`; the
    runs, their artifacts and @champion arrive, the service answers from the server, and a
    stage run again against the server logs into the copy of its run."""
    from cnnpipe import cli

    repo, tiny = project
    name = "cnnpipe-shared"
    local = ["mlflow.experiment=shared", f"mlflow.model_name={name}"]
    (repo / "params.yaml").write_text(compose_for_repo(repo, [*tiny, *local]))
    for stage in ("train", "evaluate", "export", "parity", "promote"):
        cli.main([stage])
    checkpoint = (repo / "models" / "model.ckpt").read_bytes()
    recorded = json.loads((repo / "models" / "mlflow_run.json").read_text())["run_id"]
    capsys.readouterr()
    cli.main(["share", "--to", team_server])
    said = capsys.readouterr().out
    assert said.startswith("shared 1 runs, 1 logged models and 1 registered versions from "), said
    client = mlflow.MlflowClient(team_server)
    (copy,) = experiment_runs(team_server, "shared")
    assert copy.info.status == "FINISHED" and copy.data.tags["cnnpipe.copied_from"] == recorded
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.run_id == copy.info.run_id
    # Its artifacts lie in the team's bucket, as written here.
    stored = bucket_objects(cluster, f"mlflow/{copy.info.experiment_id}/")
    history = (repo / "plots" / "train_history.csv").read_bytes()
    assert stored[f"mlflow/{copy.info.experiment_id}/{copy.info.run_id}/artifacts/plots/"
                  "train_history.csv"] == history  # fmt: skip
    model = champion.source.removeprefix("models:/")
    key = f"mlflow/{copy.info.experiment_id}/models/{model}/artifacts/model.onnx"
    assert stored[key] == (repo / "models" / "model.onnx").read_bytes()

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": team_server}
    server = subprocess.Popen(
        [str(BIN / "cnnpipe"), "serve", f"models:/{name}@champion", "--port", str(port)],
        cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health/ready", server, "cnnpipe serve")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metadata", timeout=30) as answer:
            served = json.loads(answer.read())["model"]
        assert (served["name"], served["version"]) == (name, champion.version)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server)
    cli.main(["evaluate"])  # what `dvc repro -f -s evaluate` runs
    (copy,) = experiment_runs(team_server, "shared")
    assert copy.data.tags["cnnpipe.stages_done"].split(",")[-1] == "evaluate"
    assert (repo / "models" / "model.ckpt").read_bytes() == checkpoint, "nothing retrained"
    cli.main(["share", "--from", f"sqlite:///{repo}/mlflow.db", "--to", team_server])
    assert "(1 runs were there already)" in capsys.readouterr().out


def compose_for_repo(repo: Path, overrides: list[str]) -> str:
    from cnnpipe.base.config import compose_params

    return compose_params(overrides, conf_dir=repo / "conf")


def test_the_runs_artifacts_open_in_the_mlflow_ui_through_the_server(team_server, team_pipeline):
    (pipeline,) = experiment_runs(team_server, "team-pipeline")
    link = ui_link(pipeline.info.experiment_id, pipeline.info.run_id, team_server)
    history = (team_pipeline.repo / "plots" / "train_history.csv").read_text()
    seen = artifact_as_a_newcomer(link, pipeline.info.run_name, "plots", "train_history.csv")
    assert "Models" in seen["links"] and "Evaluation runs" not in seen["links"]
    # The preview shows the file the server fetched from the bucket, row by row.
    for row in history.splitlines()[1:]:
        assert "\t".join(row.split(",")) in seen["preview"], (row, seen["preview"])


STOP_GATEWAY_AFTER_FIRST_UPLOAD = """
import os, signal, socket, threading, time
from dvc_objects.fs.base import FileSystem
real_put_file, first = FileSystem.put_file, threading.Lock()
def put_file(self, *args, **kwargs):
    result = real_put_file(self, *args, **kwargs)
    if first.acquire(blocking=False):
        os.kill(int(os.environ["GATEWAY_PID"]), signal.SIGTERM)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", int(os.environ["GATEWAY_PORT"])), 1).close()
                time.sleep(0.2)
            except OSError:
                break
    return result
FileSystem.put_file = put_file
"""


def set_remote(pipeline: TeamPipeline, cluster, name: str, url: str, secret: str = "") -> None:
    """docs/scale-out.md's remote: its URL and endpoint in .dvc/config, the credentials in
    .dvc/config.local, which git ignores."""
    s3 = cluster.state["s3"]
    pipeline.run("dvc", "remote", "add", "-f", name, url)
    pipeline.run("dvc", "remote", "modify", name, "endpointurl", cluster.s3_endpoint)
    pipeline.run("dvc", "remote", "modify", "--local", name, "access_key_id", s3["access_key"])
    pipeline.run("dvc", "remote", "modify", "--local", name, "secret_access_key",
                 secret or s3["secret_key"])  # fmt: skip


def test_a_teammate_pulls_the_outputs_from_a_dvc_remote_in_the_bucket(
    team_pipeline, cluster, tmp_path
):
    repo, s3 = team_pipeline.repo, cluster.state["s3"]
    set_remote(team_pipeline, cluster, "storage", f"s3://{BUCKET}/dvc")
    team_pipeline.run("dvc", "remote", "default", "storage")
    assert s3["secret_key"] not in (repo / ".dvc" / "config").read_text()
    ignored = team_pipeline.run("git", "status", "--porcelain", "--ignored", ".dvc").stdout
    assert "!! .dvc/config.local" in ignored, ignored

    # The gateway stops after the first object of the push: the push fails in one line...
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STOP_GATEWAY_AFTER_FIRST_UPLOAD)
    try:
        cut = team_pipeline.run(
            "dvc", "push", ok=False, PYTHONPATH=f"{hook}{os.pathsep}{repo / 'src'}",
            GATEWAY_PID=str(cluster.state["pids"]["s3"]), GATEWAY_PORT=str(s3["ports"]["s3"]),
        )  # fmt: skip
        assert cut.returncode != 0
        assert "Traceback" not in cut.stderr
        errors = [line for line in cut.stderr.splitlines() if line.startswith("ERROR")]
        each, then = fault_lines("The gateway stops during `dvc push`")
        assert errors and all(each.fullmatch(line) for line in errors[:-1]), cut.stderr[-2000:]
        assert then.fullmatch(errors[-1]), cut.stderr[-2000:]
    finally:
        cluster.start_s3()
    # ... and the next push completes it.
    pushed = team_pipeline.run("dvc", "push").stdout
    assert re.search(r"\d+ files? pushed", pushed), pushed
    cache = repo / ".dvc" / "cache" / "files" / "md5"
    stored = bucket_objects(cluster, "dvc/")
    cached = {f"dvc/files/md5/{f.relative_to(cache)}": f.read_bytes() for f in cache.rglob("*")
              if f.is_file()}  # fmt: skip
    assert stored == cached, "every cached object in the bucket, byte for byte"

    # The gateway restarted from the command line: the same remote config pushes again.
    script = [sys.executable, str(ROOT / "tools" / "local_cluster.py")]
    subprocess.run([*script, "restart", "s3", str(cluster.folder)], check=True, timeout=300,
                   capture_output=True)  # fmt: skip
    (repo / "notes.txt").write_text("pushed after the gateway's restart\n")
    team_pipeline.run("dvc", "add", "notes.txt")
    assert "1 file pushed" in team_pipeline.run("dvc", "push").stdout
    cached = {p.name for p in cache.rglob("*") if p.is_file()}
    assert {k.rsplit("/", 1)[-1] for k in bucket_objects(cluster, "dvc/")} == cached

    team_pipeline.run("git", "add", "-A")
    team_pipeline.run("git", "commit", "-qm", "Results")
    teammate = tmp_path / "teammate"
    team_pipeline.run("git", "clone", "-q", str(repo), str(teammate))
    assert not (teammate / ".dvc" / "config.local").exists(), "credentials stay out of git"
    set_remote(TeamPipeline(teammate, team_pipeline.env, ""), cluster, "storage",
               f"s3://{BUCKET}/dvc")  # fmt: skip
    # The stages up to parity are the ones that ran here (`dvc pull` alone after a full repro).
    team_pipeline.run("dvc", "pull", "--with-deps", "parity", cwd=teammate)
    assert locked_outputs(teammate) == locked_outputs(repo)
    again = team_pipeline.run("dvc", "repro", "parity", cwd=teammate).stdout
    assert "MLflow:" not in again, "no stage ran"
    assert "didn't change" in again or "up to date" in again, again


def test_wrong_credentials_a_missing_bucket_and_a_gateway_down_each_end_in_one_line(
    team_pipeline, cluster
):
    before = bucket_objects(cluster, "")
    set_remote(team_pipeline, cluster, "wrong-key", f"s3://{BUCKET}/dvc", secret="not-the-key")
    set_remote(team_pipeline, cluster, "no-bucket", "s3://no-such-bucket/dvc")
    set_remote(team_pipeline, cluster, "down", f"s3://{BUCKET}/dvc")
    faults = {
        "wrong-key": "Wrong credentials for the DVC remote",
        "no-bucket": "A DVC remote's bucket that does not exist",
        "down": "The gateway down before `dvc push`",
    }
    for remote, fault in faults.items():
        if remote == "down":
            cluster.stop_s3()
        try:
            result = team_pipeline.run("dvc", "push", "-r", remote, ok=False)
        finally:
            if remote == "down":
                cluster.start_s3()
        assert result.returncode != 0
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
        assert "Traceback" not in result.stderr and errors, result.stderr
        (line,) = fault_lines(fault)
        assert line.fullmatch(errors[0]), errors[0]
    assert bucket_objects(cluster, "") == before, "nothing written, nothing lost"
    buckets = [b["Name"] for b in cluster.s3_client().list_buckets()["Buckets"]]
    assert buckets == [BUCKET], "no bucket made by a push"


def test_a_gateway_down_before_a_stage_is_one_line_in_seconds(team_server, team_pipeline, cluster):
    """The stage's test upload fails at once: nothing is trained, and only the server can tell
    why, so the line says what to look for in its log."""
    repo = team_pipeline.repo
    outputs = {p: (repo / p).read_bytes() for p in ("models/model.ckpt", "plots/train_history.csv")}
    team_pipeline.run("cnnpipe", "params", *TEAM_TINY, "trainer.max_epochs=2")
    cluster.stop_s3()
    try:
        start = time.monotonic()
        result = team_pipeline.run("dvc", "repro", "train", ok=False)  # MLflow's own retries
        seconds = time.monotonic() - start
    finally:
        cluster.start_s3()
        team_pipeline.run("cnnpipe", "params", *TEAM_TINY)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith("cnnpipe train:")]
    assert said == [
        f"cnnpipe train: error: MLflow store {team_server}: the server cannot store artifacts (a "
        f"test upload failed; it answers): {SERVER_LOG}"
    ], result.stderr[-2000:]
    fault = (
        "The server's bucket down, missing or refusing the server's credentials when a stage starts"
    )
    assert fault_lines(fault)[0].fullmatch(said[0])
    assert seconds < 90, f"{seconds:.0f} s: MLflow's five minutes of retries came first"
    assert {p: (repo / p).read_bytes() for p in outputs} == outputs, "nothing trained"


CLIENT_FAULTS = {
    "no-bucket": "A bucket that a client writes to itself (an experiment whose artifact location "
    "is `s3://...`) does not exist",
    "wrong-secret": "... refuses the client's credentials",
    "gateway-down": "... does not answer",
}


@pytest.mark.parametrize(
    "case, env, says",
    [
        ("no-bucket", {}, "the bucket no-such-bucket does not exist; create it, or fix the "
         "artifact location"),
        ("wrong-secret", {"AWS_SECRET_ACCESS_KEY": "not-the-key"}, "the bucket cnnpipe refuses "
         "these credentials; fix AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        ("gateway-down", {"MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:PORT"}, "the bucket's "
         "endpoint http://127.0.0.1:PORT does not answer; start it, or fix the URL"),
    ],
)  # fmt: skip
def test_a_bucket_the_client_writes_to_says_which_fault_in_one_line(
    cluster, project, case, env, says
):
    """Without a server in between, the client sees the bucket's own answer."""
    repo, _ = project
    bucket = "no-such-bucket" if case == "no-bucket" else BUCKET
    store(repo).create_experiment("cnnpipe", artifact_location=f"s3://{bucket}/{case}")
    port = str(free_port())
    env = {k: v.replace("PORT", port) for k, v in {**cluster.s3_env, **env}.items()}
    start = time.monotonic()
    result = helpers.cnnpipe("train", cwd=repo, env={**env, "DVC_ROOT": str(repo)})
    assert time.monotonic() - start < 90
    assert result.returncode == 1 and "Traceback" not in result.stderr
    says = says.replace("PORT", port)
    assert result.stderr.splitlines()[-1] == (
        f"cnnpipe train: error: MLflow store sqlite:///{repo}/mlflow.db: {says}"
    )
    (line,) = fault_lines(CLIENT_FAULTS[case])
    assert line.fullmatch(result.stderr.splitlines()[-1])
    assert not (repo / "models" / "model.ckpt").exists()


def test_a_stage_that_logs_while_the_gateway_is_down_keeps_its_outputs_and_does_not_finish(
    team_server, team_pipeline, cluster, tmp_path
):
    """The gateway stops after the stage's test upload, while it trains: today's line at the
    end, its outputs kept, its run FAILED."""
    repo = team_pipeline.repo
    checkpoint = (repo / "models" / "model.ckpt").read_bytes()
    runs = experiment_runs(team_server, "team-pipeline")
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    (finished,) = [r for r in top if r.info.status == "FINISHED"]
    started = tmp_path / "started"
    hold = [
        "+callbacks.hold._target_=tests.helpers.Rendezvous",
        f"+callbacks.hold.folder={started}",
    ]
    team_pipeline.run("cnnpipe", "params", *TEAM_TINY, "trainer.max_epochs=2", *hold)
    # MLflow retries a failed upload for about 4 minutes by default; once is enough here.
    env = {**team_pipeline.env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
           "PYTHONPATH": f"{repo / 'src'}{os.pathsep}{repo}"}  # fmt: skip
    stage = subprocess.Popen(["dvc", "repro", "train"], cwd=repo, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_until(
            "the training to start", lambda: started.is_dir() and any(started.iterdir()), 120
        )
        cluster.stop_s3()
        (started / "test").touch()  # the training goes on
        _, stderr = stage.communicate(timeout=600)
    finally:
        stage.kill()
        cluster.start_s3()
        team_pipeline.run("cnnpipe", "params", *TEAM_TINY)
    assert stage.returncode != 0 and "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("cnnpipe train:")]
    assert line.startswith(f"cnnpipe train: error: MLflow store {team_server}: "), line
    (documented,) = fault_lines("The server's bucket stops while a stage works")
    assert documented.fullmatch(line), line
    # The new training is kept (its checkpoint and its two epochs), the finished run is as it
    # was, and the new run reads FAILED.
    assert (repo / "models" / "model.ckpt").read_bytes() != checkpoint
    rows = (repo / "plots" / "train_history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]
    runs = {r.info.run_id: r for r in experiment_runs(team_server, "team-pipeline")}
    assert runs[finished.info.run_id].info.status == "FINISHED"
    others = [r for r in runs.values() if r.info.run_id != finished.info.run_id
              and "mlflow.parentRunId" not in r.data.tags]  # fmt: skip
    assert {r.info.status for r in others} == {"FAILED"}
    errors = [r.data.tags[ERROR] for r in others]
    assert any("the server cannot store artifacts (it failed" in e for e in errors), errors


def test_the_cluster_script_starts_stops_and_starts_again_with_the_same_keys_and_ports(cluster):
    # `cluster` first: the session's cluster shows the packages are there and this is root.
    import psutil

    script = [sys.executable, str(ROOT / "tools" / "local_cluster.py")]
    folder = Path(tempfile.mkdtemp(prefix="cnnpipe-cli-cluster-"))

    def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([*script, *args, str(folder)], capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0 or not ok, done.stderr
        return done

    def recorded() -> dict:
        return json.loads((folder / "cluster.json").read_text())

    try:
        started = cli("start")
        conf = re.search(r"^export SLURM_CONF=(\S+)$", started.stdout, re.M)[1]
        port = re.search(r"PostgreSQL on 127.0.0.1:(\d+)", started.stdout)[1]
        first = recorded()
        pids = first["pids"]
        assert set(pids) == {"munged", "slurmctld", "slurmd", "postgres", "s3"}
        # Every daemon listens on 127.0.0.1 only.
        listening = {(name, c.laddr.ip) for name, pid in pids.items()
                     for c in psutil.Process(pid).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN}  # fmt: skip
        assert {name for name, _ in listening} == {"slurmctld", "slurmd", "postgres", "s3"}
        assert {ip for _, ip in listening} == {"127.0.0.1"}, listening
        env = {**os.environ, "SLURM_CONF": conf}
        srun = ["srun", "-n1", "echo", "ran"]
        ran = subprocess.run(srun, env=env, capture_output=True, text=True, timeout=120)
        assert ran.stdout == "ran\n", ran.stderr
        psql = ["psql", "-h", "127.0.0.1", "-p", port, "-U", "postgres"]
        subprocess.run(["createdb", *psql[1:], "kept"], check=True, timeout=60)
        # The bucket answers to the credentials printed, and to no others.
        exported = dict(re.findall(r"^export (AWS_\w+|MLFLOW_S3_ENDPOINT_URL)=(\S+)$",
                                   started.stdout, re.M))  # fmt: skip
        s3 = {"endpoint_url": exported["MLFLOW_S3_ENDPOINT_URL"], "region_name": "us-east-1"}
        key = {"aws_access_key_id": exported["AWS_ACCESS_KEY_ID"]}
        bucket = boto3.client("s3", **s3, **key,
                              aws_secret_access_key=exported["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
        bucket.put_object(Bucket=BUCKET, Key="kept.txt", Body=b"kept")
        wrong = boto3.client("s3", **s3, **key, aws_secret_access_key="not-the-key")
        with pytest.raises(botocore.exceptions.ClientError, match="SignatureDoesNotMatch"):
            wrong.list_objects_v2(Bucket=BUCKET)
        assert cli("start").returncode == 0 and recorded()["pids"] == pids, "nothing started twice"
        munge_key = (folder / "munge" / "munge.key").read_bytes()

        # Stopped, and started again in the same folder: the same keys, ports and data.
        cli("stop")
        assert not [pid for pid in pids.values() if psutil.pid_exists(pid)], "all stopped"
        assert recorded()["pids"] == {}
        again = cli("start")
        assert again.stdout == started.stdout, "the same ports and keys, so the same lines"
        assert {k: v for k, v in recorded().items() if k != "pids"} == {
            k: v for k, v in first.items() if k != "pids"
        }
        assert (folder / "munge" / "munge.key").read_bytes() == munge_key
        ran = subprocess.run(srun, env=env, capture_output=True, text=True, timeout=120)
        assert ran.stdout == "ran\n", ran.stderr
        select = subprocess.run([*psql, "-d", "kept", "-tAc", "select 1"], capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert select.stdout == "1\n", select.stderr
        assert bucket.get_object(Bucket=BUCKET, Key="kept.txt")["Body"].read() == b"kept"

        # The gateway alone: stopped, its port taken meanwhile (one line), then started.
        cli("stop", "s3")
        assert set(recorded()["pids"]) == {"munged", "slurmctld", "slurmd", "postgres"}
        s3_port = recorded()["s3"]["ports"]["s3"]
        with socket.create_server(("127.0.0.1", s3_port)):
            refused = cli("start", "s3", ok=False)
        assert refused.returncode == 1
        assert refused.stderr == (
            f"local cluster: error: port {s3_port} of s3, recorded in {folder}/cluster.json, is "
            "taken by another process: stop that process, or start a cluster in another folder\n"
        )
        cli("restart", "s3")
        assert bucket.get_object(Bucket=BUCKET, Key="kept.txt")["Body"].read() == b"kept"
        pids = recorded()["pids"]
    finally:
        subprocess.run([*script, "stop", str(folder)], timeout=300)
    assert not [pid for pid in pids.values() if psutil.pid_exists(pid)], "all stopped"
    shutil.rmtree(folder, ignore_errors=True)
    # ... and the session's cluster still runs.
    assert slurm(cluster, "sinfo", "-h", "-o", "%t").stdout.strip() == "idle"

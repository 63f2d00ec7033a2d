"""Beyond one machine, for real: a one-node SLURM cluster and a PostgreSQL server started by
tools/local_cluster.py (the `cluster` fixture), a team's `mlflow server` on PostgreSQL, and the
journeys of docs/scale-out.md through them on tiny data."""

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from sqlalchemy.exc import SQLAlchemyError

from cnnpipe.fit import HISTORY_KEYS
from cnnpipe.localhost import free_port, wait_for_http, wait_until
from cnnpipe.serving.onnx_model import OnnxModel
from cnnpipe.tracking.lineage import recipe_params
from tests import helpers
from tests.helpers import ROOT, SEARCH, compose_for, copy_repo, make_archive, repo_env

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
    PostgreSQL, artifacts kept by the server in a folder standing in for the bucket."""
    database = cluster.create_database("mlflow")
    bucket = tmp_path_factory.mktemp("bucket")
    port = free_port()
    log = bucket.parent / "mlflow-server.log"
    with open(log, "w") as output:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", database,
             "--artifacts-destination", str(bucket), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "2"],
            stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/health", server, "mlflow server", deadline_s=180)
    except (RuntimeError, TimeoutError) as error:
        server.kill()
        pytest.fail(f"{error}\n{log.read_text()[-2000:]}")
    yield base, bucket
    server.terminate()
    server.wait(timeout=60)


def experiment_runs(uri: str, name: str) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(name).experiment_id])


def test_a_slurm_sweep_runs_its_jobs_at_once_and_logs_everything_to_the_team_server(
    cluster, team_server, project, record_property
):
    repo, tiny = project
    base, bucket = team_server
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
        assert recipe_params(compose_for(child)) == child.data.params, "no param lost"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val/acc")] == [1, 2]
        assert {"test.acc", "train.seconds", "train/loss"} <= set(child.data.metrics)
        assert child.data.tags["sweep.overrides"].startswith("optim.lr=")
    assert len(list(bucket.rglob("train_history.csv"))) == 2, "artifacts kept by the server"
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
    base, _ = team_server
    storage = cluster.create_database("optuna")
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


def test_the_pipeline_logs_registers_and_serves_through_the_team_server(
    team_server, tmp_path, http_server
):
    base, bucket = team_server
    www_base, www = http_server
    md5 = make_archive(www / "cifar-10-python.tar.gz")
    repo = tmp_path / "repo"
    copy_repo(repo)
    env = {**repo_env(repo), "MLFLOW_TRACKING_URI": base}

    def run(*command: str) -> str:
        result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
        assert result.returncode == 0, (
            f"{command}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        )
        return result.stdout

    (repo / "conf" / "local").mkdir()
    (repo / "conf" / "local" / "default.yaml").write_text(
        f"data:\n  source: {www_base}/cifar-10-python.tar.gz\n  md5: {md5}\n"
    )
    tiny = ["data.val_size=40", "trainer.max_epochs=1", "loader.batch_size=64",
            "evaluate.batch_size=16", "mlflow.experiment=team-pipeline"]  # fmt: skip
    run("cnnpipe", "params", *tiny)
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "pipeline"]):
        run("git", *command)
    # The stages that log, register and promote the model; the rest log the same way.
    run("dvc", "repro", "parity")

    client = mlflow.MlflowClient(base)
    (pipeline,) = experiment_runs(base, "team-pipeline")
    assert pipeline.info.status == "FINISHED"
    test_acc = json.loads((repo / "metrics" / "eval.json").read_text())["test.acc"]
    assert pipeline.data.metrics["test.acc"] == test_acc
    assert list(bucket.rglob("model.onnx")), "the ONNX model kept by the server"
    name = "cnnpipe-cifar10"
    first = client.get_model_version_by_alias(name, "champion")
    assert first.run_id == pipeline.info.run_id

    # Parity again (another batch size): a new version as accurate as the first takes the alias.
    run("cnnpipe", "params", *tiny, "parity.batch_size=25")
    run("dvc", "repro", "parity")
    champion = client.get_model_version_by_alias(name, "champion")
    assert int(champion.version) == int(first.version) + 1 and champion.run_id == first.run_id

    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "cnnpipe"), "serve", f"models:/{name}@champion", "--port", str(port)],
        cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
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

    table = run("cnnpipe", "runs", "--last", "5").splitlines()
    assert table[0].split()[:3] == ["run", "started", "status"]
    assert any(line.startswith(pipeline.info.run_id[:8]) for line in table[1:]), table


def test_the_cluster_script_starts_a_cluster_and_stops_exactly_what_it_started(cluster):
    # `cluster` first: the session's cluster shows the packages are there and this is root.
    import psutil

    script = [sys.executable, str(ROOT / "tools" / "local_cluster.py")]
    folder = Path(tempfile.mkdtemp(prefix="cnnpipe-cli-cluster-"))
    try:
        started = subprocess.run([*script, "start", str(folder)], capture_output=True,
                                 text=True, timeout=300)  # fmt: skip
        assert started.returncode == 0, started.stderr
        conf = re.search(r"^export SLURM_CONF=(\S+)$", started.stdout, re.M)[1]
        port = re.search(r"PostgreSQL on 127.0.0.1:(\d+)", started.stdout)[1]
        pids = json.loads((folder / "cluster.json").read_text())["pids"]
        assert set(pids) == {"munged", "slurmctld", "slurmd", "postgres"}
        env = {**os.environ, "SLURM_CONF": conf}
        ran = subprocess.run(["srun", "-n1", "echo", "ran"], env=env, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        assert ran.stdout == "ran\n", ran.stderr
        psql = ["psql", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "-tAc", "select 1"]
        assert subprocess.run(psql, capture_output=True, text=True, timeout=60).stdout == "1\n"
        again = subprocess.run([*script, "start", str(folder)], capture_output=True, text=True)
        assert again.returncode == 1
        assert again.stderr.startswith("local cluster: error: a cluster is recorded in ")
    finally:
        subprocess.run([*script, "stop", str(folder)], timeout=300)
    assert not [pid for pid in pids.values() if psutil.pid_exists(pid)], "all stopped"
    assert not (folder / "cluster.json").exists()
    # ... and the session's cluster still runs.
    assert slurm(cluster, "sinfo", "-h", "-o", "%t").stdout.strip() == "idle"
    shutil.rmtree(folder, ignore_errors=True)

"""The MLflow run a person meets: its name, the recipe once, curves on epochs, one name per
quantity, lineage, a dataset by content, and a status that is true, on a real sqlite store."""

import contextlib
import csv
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from cnnpipe import cli
from cnnpipe.base.config import load_params
from cnnpipe.base.localhost import free_port
from cnnpipe.data.preparation import prepare
from cnnpipe.data.prepared import read_manifest
from cnnpipe.tracking.lineage import recipe_params
from cnnpipe.tracking.stage_run import read_run_id
from cnnpipe.tracking.store import tracking_uri
from cnnpipe.training.fit import HISTORY_KEYS, train
from tests.helpers import cnnpipe, composed, store, trained_params


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t"}
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    done = subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def stage(*argv: str) -> None:
    cli.main(list(argv))


def the_run(repo: Path):
    return store(repo).get_run(read_run_id(repo / "models/mlflow_run.json"))


def test_default_store_is_sqlite_in_the_dvc_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking_uri("http://mlflow.example:5000") == "http://mlflow.example:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////srv/team.db")
    assert tracking_uri("http://configured") == "sqlite:////srv/team.db"


def test_missing_run_file_says_which_stage_to_run(tmp_path):
    with pytest.raises(Exception, match="dvc repro train"):
        read_run_id(tmp_path / "mlflow_run.json")


def test_recipe_params_leave_out_paths_locations_and_speed_settings(project):
    params = recipe_params(load_params())
    composed = yaml.safe_load(Path("params.yaml").read_text())
    assert params["optim.lr"] == str(composed["optim"]["lr"])
    assert params["data.mean"] == str(composed["data"]["mean"])
    left_out = {f"data.{k}" for k in ("name", "source", "md5", "timeout_s", "dependency")}
    left_out |= {"data.skip_unreadable", "data.extra_train"}
    left_out |= {"callbacks.progress_bar._target_", "callbacks.progress_bar.refresh_rate"}
    left_out |= {"evaluate.batch_size", "parity.batch_size", "promote.batch_size", "promote.alpha"}
    assert not left_out & set(params)
    assert not [k for k in params if k.startswith(("paths.", "mlflow."))]
    # Everything else of the composed config is there, once.
    everything = {k for k in flat(composed) if not k.startswith(("paths.", "mlflow."))}
    assert set(params) == everything - left_out


def flat(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_a_pipeline_run_a_person_can_read(project, monkeypatch, archive):
    repo, _ = project
    # A system metrics sample every 0.1 s, so a training of a second has some.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "recipe")
    commit = git(repo, "rev-parse", "HEAD")

    stage("train")
    running_tags = the_run(repo).data.tags
    stage("evaluate")
    run = the_run(repo)
    client = store(repo)

    # 1. A name that says what the run is, and the commit.
    assert run.info.run_name == f"ChapterCNN 2 epochs @{commit[:7]}"
    assert run.data.tags["mlflow.source.git.commit"] == commit
    assert run.data.tags["git.dirty"] == "false"
    # 2. The recipe as params, once: no paths, no second copy from Lightning; and the precision
    # trainer.precision=auto chose on this CPU.
    assert run.data.params == trained_params(load_params())
    assert not {"lr", "net/_target_", "class_names", "mean"} & set(run.data.params)
    # ... and the data by content.
    (dataset,) = run.inputs.dataset_inputs
    manifest = read_manifest(Path(load_params().paths.data))
    digest = hashlib.sha256(f"32 {json.dumps(manifest.classes)}".encode())
    for f in manifest.files:
        digest.update(f"{f['sha256']} {f['label']} {f['split']}\n".encode())
    assert dataset.dataset.digest == digest.hexdigest()[:16]
    assert dataset.dataset.name == "cifar10"
    assert archive[0].as_uri() in dataset.dataset.source
    (column,) = json.loads(dataset.dataset.schema)["mlflow_colspec"]
    assert column["tensor-spec"] == {"dtype": "uint8", "shape": [-1, 32, 32, 3]}
    tags = {t.key: t.value for t in dataset.tags}
    assert tags["image_size"] == "32x32" and tags["images"] == "250"
    assert json.loads(tags["class_counts"]) == manifest.class_counts()
    # 3. Curves on epochs 1..N, one series each, no stray `epoch` series.
    with open("plots/train_history.csv") as f:
        rows = list(csv.DictReader(f))
    for key in HISTORY_KEYS:
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [
            (int(r["epoch"]), float(r[key])) for r in rows
        ]
    assert "epoch" not in run.data.metrics
    # 4. One name per quantity: the JSON files and the run hold the same keys and values.
    for path in ("metrics/train.json", "metrics/eval.json"):
        recorded = json.loads(Path(path).read_text())
        assert {k: run.data.metrics[k] for k in recorded} == recorded
    # 5. Lineage: the configuration as run, system metrics while training.
    lineage = client.download_artifacts(run.info.run_id, "lineage/params.yaml", str(repo))
    assert yaml.safe_load(Path(lineage).read_text()) == yaml.safe_load(
        Path("params.yaml").read_text()
    )
    assert "system/cpu_utilization_percentage" in run.data.metrics
    # 6. The truth: RUNNING only while a stage runs; FINISHED after it; the process tags gone.
    assert run.info.status == "FINISHED"
    assert running_tags["cnnpipe.stage"] == "train" and "cnnpipe.pid" not in running_tags
    assert run.data.tags["cnnpipe.stage"] == "evaluate"
    test_acc = json.loads(Path("metrics/eval.json").read_text())["test.acc"]
    assert f"test accuracy, as deployed: **{test_acc:.2%}**" in run.data.tags["mlflow.note.content"]

    # A change to the code shows in the next run's name and tags.
    (repo / "conf" / "optim" / "adamw_onecycle.yaml").write_text(
        (repo / "conf" / "optim" / "adamw_onecycle.yaml").read_text() + "\n# a note\n"
    )
    stage("train")
    dirty = the_run(repo)
    assert dirty.info.run_name == f"ChapterCNN 2 epochs @{commit[:7]}+dirty"
    assert dirty.data.tags["git.dirty"] == "true"
    assert "uncommitted changes" in dirty.data.tags["mlflow.note.content"]


def test_the_same_data_has_the_same_digest_from_any_url(tmp_path, archive):
    copy = tmp_path / "elsewhere" / "mirror.tar.gz"
    copy.parent.mkdir()
    copy.write_bytes(archive[0].read_bytes())
    data = composed().data
    for url, dest in ((str(archive[0]), "a"), (copy.as_uri(), "b")):
        prepare(OmegaConf.merge(data, {"source": url, "md5": archive[1]}), tmp_path / dest)
    a, b = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    assert a.digest() == b.digest()
    assert (a.source, b.source) == (archive[0].as_uri(), copy.as_uri())


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


OUTPUTS = [
    "models/model.ckpt",
    "models/mlflow_run.json",
    "metrics/train.json",
    "plots/train_history.csv",
]


@pytest.mark.parametrize("fault", ["unsafe-images", "diverged"])
def test_a_failed_train_stage_reads_failed_and_leaves_the_previous_results(project, fault):
    repo, _ = project
    stage("train")
    good = the_run(repo)
    before = {name: (repo / name).read_bytes() for name in OUTPUTS}

    if fault == "unsafe-images":
        batch = Path(load_params().paths.data) / "images.npy"
        kept = batch.read_bytes()
        np.save(batch, np.array([RunsCode()], dtype=object), allow_pickle=True)
        reason = "holds no readable prepared arrays (object (1,) is not uint8 (N, H, W, 3))"
    else:
        params = yaml.safe_load(Path("params.yaml").read_text())
        params["optim"]["lr"] = 1e30
        Path("params.yaml").write_text(yaml.safe_dump(params))
        reason = "training diverged"
    with pytest.raises(SystemExit) as failed:
        stage("train")
    assert str(failed.value).startswith("cnnpipe train: error: ") and reason in str(failed.value)
    assert "\n" not in str(failed.value)

    assert {name: (repo / name).read_bytes() for name in OUTPUTS} == before
    client = store(repo)
    (bad,) = [
        r
        for r in client.search_runs([good.info.experiment_id])
        if r.info.run_id != good.info.run_id
    ]
    assert bad.info.status == "FAILED"
    assert bad.data.tags["cnnpipe.failed_stage"] == "train"
    assert reason in bad.data.tags["cnnpipe.error"]
    assert bad.data.tags["mlflow.note.content"].startswith("**FAILED in stage `train`**")
    assert not Path("pwned").exists()

    # The later stages still log into the run of the model they read.
    if fault == "unsafe-images":
        batch.write_bytes(kept)
    stage("evaluate")
    assert the_run(repo).info.run_id == good.info.run_id
    assert "test.acc" in the_run(repo).data.metrics
    assert client.get_run(bad.info.run_id).info.status == "FAILED"


def test_a_later_stage_that_fails_marks_the_run_until_it_succeeds(project):
    repo, _ = project
    stage("train")
    checkpoint = repo / "models/model.ckpt"
    good = checkpoint.read_bytes()
    checkpoint.write_bytes(good[:5000])
    with pytest.raises(SystemExit, match="cnnpipe evaluate: error: .* is not a cnnpipe checkpoint"):
        stage("evaluate")
    failed = the_run(repo)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["cnnpipe.failed_stage"] == "evaluate"
    assert "**FAILED in stage `evaluate`**" in failed.data.tags["mlflow.note.content"]

    checkpoint.write_bytes(good)
    stage("evaluate")
    mended = the_run(repo)
    assert mended.info.status == "FINISHED"
    assert not {"cnnpipe.failed_stage", "cnnpipe.error"} & set(mended.data.tags)
    assert "FAILED" not in mended.data.tags["mlflow.note.content"]


def test_a_failed_rerun_of_a_finished_stage_leaves_the_finished_run_as_it_was(project):
    repo, _ = project
    stage("train")
    stage("evaluate")
    finished = the_run(repo)
    results = (repo / "metrics/eval.json").read_text()
    images = Path(load_params().paths.data) / "images.npy"
    images.write_bytes(images.read_bytes()[:1000])  # a truncated array
    with pytest.raises(SystemExit, match="cnnpipe evaluate: error: .*prepared arrays") as error:
        stage("evaluate")
    run = the_run(repo)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == finished.data.metrics
    assert run.data.tags["mlflow.note.content"] == finished.data.tags["mlflow.note.content"]
    assert not {"cnnpipe.failed_stage", "cnnpipe.error"} & set(run.data.tags)
    assert (repo / "metrics/eval.json").read_text() == results
    # The failure is a run of its own, under the one it would have changed.
    query = f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    (attempt,) = store(repo).search_runs([run.info.experiment_id], query)
    assert (attempt.info.run_name, attempt.info.status) == ("evaluate failed", "FAILED")
    said = str(error.value.code).removeprefix("cnnpipe evaluate: error: ")
    assert attempt.data.tags["cnnpipe.error"] == said
    assert attempt.data.tags["mlflow.note.content"].startswith(
        f"**FAILED in stage `evaluate`**: {said}"
    )


# The train stage, killed with SIGKILL in the middle of its third epoch.
KILLED_IN_EPOCH_3 = """
import os, signal
from cnnpipe import cli
from cnnpipe.training.classifier import LitClassifier

step = LitClassifier.training_step

def step_then_die(self, batch, index):
    if self.current_epoch == 2 and index == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, batch, index)

LitClassifier.training_step = step_then_die
cli.main(["train"])
"""


def kill_training(repo: Path) -> str:
    """Run the train stage until SIGKILL in epoch 3; return the run it left."""
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_IN_EPOCH_3], cwd=repo, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    (run,) = store(repo).search_runs([store(repo).get_experiment_by_name("cnnpipe").experiment_id])
    assert run.info.status == "RUNNING", "nobody could say otherwise yet"
    return run.info.run_id


@pytest.fixture
def four_epochs(project):
    repo, _ = project
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["trainer"]["max_epochs"] = 4
    Path("params.yaml").write_text(yaml.safe_dump(params))
    return repo


@pytest.mark.slow
def test_a_killed_training_is_continued_by_the_resume(four_epochs):
    repo = four_epochs
    uninterrupted = train(load_params())
    rows = Path("plots/train_history.csv").read_text()
    shutil.rmtree(repo / "models")
    Path("plots/train_history.csv").unlink()

    run_id = kill_training(repo)
    assert not (repo / "models/mlflow_run.json").exists(), "a run that did not finish is no result"
    client = store(repo)
    assert [m.step for m in client.get_metric_history(run_id, "val/acc")] == [1, 2]

    stage("train")
    run = the_run(repo)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    # Every epoch once, though epochs 1 and 2 were logged by the killed process.
    assert [m.step for m in client.get_metric_history(run_id, "val/acc")] == [1, 2, 3, 4]
    # ... and the result of a run that was never interrupted.
    resumed = json.loads(Path("metrics/train.json").read_text())
    assert {k: resumed[k] for k in HISTORY_KEYS} == {k: uninterrupted[k] for k in HISTORY_KEYS}
    without_seconds = [line.rsplit(",", 1)[0] for line in rows.splitlines()]
    resumed_rows = Path("plots/train_history.csv").read_text().splitlines()
    assert [line.rsplit(",", 1)[0] for line in resumed_rows] == without_seconds
    assert not Path(load_params().paths.resume).exists(), "finished runs leave no resume state"


@pytest.mark.slow
def test_a_killed_training_not_resumed_reads_killed(four_epochs):
    repo = four_epochs
    run_id = kill_training(repo)
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["optim"]["lr"] = 0.001  # another recipe: it starts afresh
    Path("params.yaml").write_text(yaml.safe_dump(params))
    stage("train")

    killed = store(repo).get_run(run_id)
    assert killed.info.status == "KILLED"
    assert killed.data.tags["cnnpipe.failed_stage"] == "train"
    assert the_run(repo).info.status == "FINISHED" and the_run(repo).info.run_id != run_id


def one_line_store_error(result: subprocess.CompletedProcess, uri: str, says: str) -> None:
    assert result.returncode == 1
    # One line on stderr, naming the store and what to do: no traceback, no MLflow log lines.
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"cnnpipe train: error: MLflow store {uri}: "), result.stderr
    assert says in result.stderr


@pytest.mark.slow
def test_a_store_that_is_down_read_only_or_full_fails_in_one_line(project):
    repo, _ = project
    db = repo / "mlflow.db"
    store(repo).search_experiments()  # an empty store with MLflow's tables

    down = f"http://127.0.0.1:{free_port()}"
    env = {"MLFLOW_TRACKING_URI": down, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    result = cnnpipe("train", cwd=repo, env=env)
    one_line_store_error(result, down, "the server does not answer")

    read_only = f"sqlite:///file:{db}?mode=ro&uri=true"
    result = cnnpipe("train", cwd=repo, env={"MLFLOW_TRACKING_URI": read_only})
    one_line_store_error(result, read_only, "read-only")

    # A real full disk: the store on a small file system with no byte left.
    full = repo.parent / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(full)])
    if mounted.returncode != 0:
        pytest.skip("mounting a small file system needs root")
    try:
        shutil.copy(db, full / "mlflow.db")
        with open(full / "filler", "wb", buffering=0) as filler:
            for chunk in (65536, 4096, 512, 1):
                with contextlib.suppress(OSError):
                    while True:
                        filler.write(b"\0" * chunk)
        on_full_disk = f"sqlite:///{full / 'mlflow.db'}"
        result = cnnpipe("train", cwd=repo, env={"MLFLOW_TRACKING_URI": on_full_disk})
    finally:
        subprocess.run(["umount", str(full)], check=True)
    one_line_store_error(result, on_full_disk, "the disk is full")
    assert not (repo / "models").exists() and not (repo / ".resume").exists()


@pytest.mark.slow
def test_a_locked_store_fails_in_one_line_after_mlflows_wait(project):
    repo, _ = project
    store(repo).search_experiments()
    lock = sqlite3.connect(repo / "mlflow.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        result = cnnpipe("train", cwd=repo)
    finally:
        lock.close()
    one_line_store_error(result, f"sqlite:///{repo / 'mlflow.db'}", "locked by another process")
    assert not (repo / "models").exists()


def test_a_store_that_takes_no_artifacts_fails_the_stage_before_it_trains(project):
    """The stage uploads a small file first: an artifact location that cannot be written is one
    line at once, not an error after the training, and the run reads FAILED."""
    repo, _ = project
    blocker = repo / "a-file"
    blocker.write_text("artifacts cannot go under a file\n")
    store(repo).create_experiment("cnnpipe", artifact_location=(blocker / "artifacts").as_uri())
    with pytest.raises(SystemExit) as exit_:
        stage("train")
    said = str(exit_.value.code)
    assert said.startswith(f"cnnpipe train: error: MLflow store sqlite:///{repo}/mlflow.db: ")
    assert "Not a directory" in said and "\n" not in said
    assert not (repo / "models" / "model.ckpt").exists(), "nothing trained"
    (run,) = store(repo).search_runs([store(repo).get_experiment_by_name("cnnpipe").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["cnnpipe.failed_stage"] == "train"


def test_runs_shared_to_another_store_are_found_there_by_the_stages(project, monkeypatch, capsys):
    """`cnnpipe share` copies the runs; with the other store as MLFLOW_TRACKING_URI, a stage
    finds the copy of the run models/mlflow_run.json records; a store with neither says so."""
    repo, _ = project
    stage("train")
    local, shared = f"sqlite:///{repo}/mlflow.db", f"sqlite:///{repo}/team.db"
    recorded = json.loads((repo / "models/mlflow_run.json").read_text())
    assert recorded["store"] == local
    current = mlflow_current()
    stage("share", "--to", shared)
    assert capsys.readouterr().out.strip().endswith(f"to {shared} (0 runs were there already)")
    assert mlflow_current() == current, "later commands of this process use the store they did"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared)
    stage("evaluate")
    team = mlflow_client(shared)
    (copy,) = team.search_runs([team.get_experiment_by_name("cnnpipe").experiment_id])
    assert copy.data.tags["cnnpipe.copied_from"] == recorded["run_id"]
    assert copy.data.tags["cnnpipe.stages_done"].split(",") == ["train", "evaluate"]
    original = store(repo).get_run(recorded["run_id"])
    for key in original.data.metrics:
        history = [m.value for m in store(repo).get_metric_history(recorded["run_id"], key)]
        assert [m.value for m in team.get_metric_history(copy.info.run_id, key)] == history
    assert copy.data.params == original.data.params
    assert json.loads((repo / "models/mlflow_run.json").read_text()) == recorded, "not rewritten"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo}/empty.db")
    with pytest.raises(SystemExit) as exit_:
        stage("evaluate")
    assert str(exit_.value.code) == (
        f"cnnpipe evaluate: error: the run {recorded['run_id']} that models/mlflow_run.json "
        f"records is not in sqlite:///{repo}/empty.db, nor a copy of it: it was logged to "
        f"{local}; copy it here with `cnnpipe share --from {local} --to "
        f"sqlite:///{repo}/empty.db`, or train again with `dvc repro -f train`"
    )


def mlflow_client(uri: str):
    import mlflow

    return mlflow.MlflowClient(uri, registry_uri=uri)


def mlflow_current() -> tuple:
    import mlflow

    return (
        mlflow.get_tracking_uri(),
        mlflow.get_registry_uri(),
        os.environ.get("MLFLOW_TRACKING_URI"),
    )

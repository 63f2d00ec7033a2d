"""A crash anywhere leaves a true record: each stage killed with SIGKILL while it writes its
first output (the moment that leaves the most behind), then the next cnnpipe commands."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from cnnpipe.base.config import compose_params, output_roots
from tests.helpers import CONF, ROOT, TINY, cnnpipe, make_archive, store

STAGES = [
    "prepare", "train", "evaluate", "params-report", "export", "parity", "promote", "quantize",
    "baseline", "chapter",
]  # fmt: skip

# The stage in this process, which SIGKILLs itself when it puts its first temporary file or
# folder in place: it is whole under its temporary name, the output not yet replaced.
DIE_AT_FIRST_OUTPUT = """
import os, signal, sys
import cnnpipe.base.files
def die():
    os.kill(os.getpid(), signal.SIGKILL)
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if ".partial-" in os.fspath(src):
        die()
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
cnnpipe.base.files.swap = lambda new, path: die()
from cnnpipe import cli
cli.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A folder where every stage has run once on tiny data, as `dvc repro` would run them."""
    repo = tmp_path_factory.mktemp("finished") / "repo"
    shutil.copytree(CONF, repo / "conf")
    md5 = make_archive(repo.parent / "cifar-10-python.tar.gz")
    overrides = [
        f"data.source={repo.parent / 'cifar-10-python.tar.gz'}", f"data.md5={md5}", *TINY,
        "callbacks.progress_bar.refresh_rate=0", "evaluate.batch_size=16",
        "quantize.max_accuracy_drop=1.0", "quantize.min_speedup=0",
    ]  # fmt: skip
    (repo / "params.yaml").write_text(compose_params(overrides, conf_dir=repo / "conf"))
    for stage in STAGES:
        cnnpipe(stage, cwd=repo, env={"DVC_ROOT": str(repo)}, check=True)
    return repo


def outputs(repo: Path) -> dict[str, bytes]:
    """Every file of the pipeline's outputs, by path, temporary files aside."""
    roots = ["data", "models", "metrics", "plots", "reports"]
    return {
        str(f.relative_to(repo)): f.read_bytes()
        for root in roots
        for f in sorted((repo / root).rglob("*"))
        if f.is_file() and ".partial-" not in str(f)
    }


def leftovers(repo: Path) -> list[str]:
    return sorted(str(p.relative_to(repo)) for p in repo.rglob(".*.partial-*"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_killed_while_writing_leaves_a_true_record(finished, tmp_path, stage):
    repo = tmp_path / "repo"
    shutil.copytree(finished, repo)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DVC_ROOT": str(repo)}
    before = outputs(repo)
    client = store(repo)
    experiment = client.get_experiment_by_name("cnnpipe").experiment_id
    runs_before = {r.info.run_id: r.info.status for r in client.search_runs([experiment])}

    killed = subprocess.run(
        [sys.executable, "-c", DIE_AT_FIRST_OUTPUT, stage], cwd=repo, env=env, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert leftovers(repo), "the kill came while a temporary file was there"
    # No output torn or replaced: each is the one before the kill, byte for byte.
    assert outputs(repo) == before

    # The next cnnpipe command tells the truth: no run reads RUNNING.
    listed = cnnpipe("runs", cwd=repo, env={"DVC_ROOT": str(repo)}, check=True).stdout
    assert "RUNNING" not in listed and "KILLED*" not in listed
    after = {r.info.run_id: r for r in client.search_runs([experiment])}
    assert [r.info.status for r in after.values()].count("RUNNING") == 0
    new = [r for i, r in after.items() if i not in runs_before]
    if stage in ("prepare", "train"):
        # train starts a run of its own, which the kill ended; prepare opens none.
        assert [r.info.status for r in new] == (["KILLED"] if stage == "train" else [])
    else:
        # A finished run whose stage ran again keeps its status and results; the killed
        # attempt is a run of its own under it.
        assert {i: after[i].info.status for i in runs_before} == runs_before
        (attempt,) = new
        name = stage.replace("-", "_")
        assert (attempt.info.run_name, attempt.info.status) == (f"{name} killed", "KILLED")
        assert attempt.data.tags["cnnpipe.error"] == f"the {name} process ended without finishing"
        assert attempt.data.tags["mlflow.parentRunId"] in runs_before

    # ... and removes what the dead process left, and nothing else, as the next stage would.
    assert leftovers(repo) == []
    cnnpipe("params-report", cwd=repo, env={"DVC_ROOT": str(repo)}, check=True)
    assert not (repo / "models/baseline/.resume").exists(), "resume state is not an output"
    assert outputs(repo).keys() == before.keys()


@pytest.mark.slow
def test_runs_on_a_read_only_store_lists_a_killed_run_and_says_why_it_reads_running(
    finished, tmp_path
):
    repo = tmp_path / "repo"
    shutil.copytree(finished, repo)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DVC_ROOT": str(repo)}
    killed = subprocess.run(
        [sys.executable, "-c", DIE_AT_FIRST_OUTPUT, "train"], cwd=repo, env=env, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL
    read_only = {
        "DVC_ROOT": str(repo),
        "MLFLOW_TRACKING_URI": f"sqlite:///file:{repo}/mlflow.db?mode=ro&uri=true",
    }
    listed = cnnpipe("runs", cwd=repo, env=read_only, check=True).stdout
    *table, note = listed.splitlines()
    (row,) = [line for line in table if "KILLED*" in line]
    assert (
        note.startswith("KILLED*: the run's process is gone, but the store") and "read-only" in note
    )
    client = store(repo)
    experiment = client.get_experiment_by_name("cnnpipe").experiment_id
    assert [r.info.status for r in client.search_runs([experiment])].count("RUNNING") == 1
    # Where the store can be written, the same command closes it.
    listed = cnnpipe("runs", cwd=repo, env={"DVC_ROOT": str(repo)}, check=True).stdout
    assert row.split()[0] in listed and "KILLED*" not in listed
    assert [r.info.status for r in client.search_runs([experiment])].count("RUNNING") == 0


@pytest.mark.slow
@pytest.mark.parametrize("stage, key", [("export", "onnx"), ("train", "checkpoint")])
def test_a_full_disk_names_the_output_and_its_folder(finished, tmp_path, stage, key):
    repo = tmp_path / "repo"
    shutil.copytree(finished, repo)
    full = repo / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)])
    if mounted.returncode != 0:
        pytest.skip("mounting a small file system needs root")
    try:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["paths"][key] = f"full/model{Path(params['paths'][key]).suffix}"
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        failed = cnnpipe(stage, cwd=repo, env={"DVC_ROOT": str(repo)})
        left = sorted(p.name for p in full.iterdir())
    finally:
        subprocess.run(["umount", str(full)], check=True)
    said = failed.stderr.strip().splitlines()[-1]
    want = f"cnnpipe {stage}: error: cannot write {params['paths'][key]} (No space left on device)"
    assert said.startswith(want), failed.stderr[-2000:]
    assert said.endswith("the disk that holds full/ is full; free some space there, then run again")
    assert left == [], "nothing half-written"


def test_leftovers_are_looked_for_beside_the_outputs_only():
    cfg = OmegaConf.create({"paths": {"a": "models/x.ckpt", "b": "metrics/y.json", "c": "/d/e/f"}})
    assert output_roots(cfg) == [Path("/d/e"), Path("metrics"), Path("models")]

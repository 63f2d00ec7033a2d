"""`dvc repro` of the whole pipeline in a temporary git repository, fetching over real HTTP."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import onnx
import pytest
from omegaconf import OmegaConf

from conftest import make_archive

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = [
    "data/cifar-10-batches-py/test_batch",
    "models/model.ckpt",
    "models/mlflow_run.json",
    "models/model.onnx",
    "metrics/train.json",
    "metrics/eval.json",
    "metrics/params.json",
    "metrics/parity.json",
    "plots/train_history.csv",
    "plots/confusion.csv",
    "plots/confusion.png",
    "reports/params.md",
    "models/baseline/model.ckpt",
    "metrics/baseline.json",
    "metrics/chapter.json",
    "reports/chapter.md",
    "plots/chapter/params.png",
    "plots/chapter/curves.png",
    "plots/chapter/filters.png",
    "plots/chapter/feature_maps.png",
    "plots/chapter/mistakes.png",
]


def copy_repo(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in files:
        if (ROOT / name).is_file() and not name.startswith((".dvc/tmp", "dvc.lock")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


@pytest.mark.slow
def test_dvc_repro_end_to_end(tmp_path, http_server):
    base, www = http_server
    md5 = make_archive(www / "cifar-10-python.tar.gz")
    repo = tmp_path / "repo"
    copy_repo(repo)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(repo / "src"),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }

    def run(*cmd):
        result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    overrides = [
        f"data.url={base}/cifar-10-python.tar.gz",
        f"data.md5={md5}",
        "data.val_size=40",
        "trainer.max_epochs=1",
        "trainer.batch_size=64",
        "evaluate.batch_size=16",
    ]
    run("cnnpipe", "params", *overrides)
    run("git", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "pipeline")
    commit = run("git", "rev-parse", "HEAD").strip()

    run("dvc", "repro")
    for name in OUTPUTS:
        assert (repo / name).is_file(), f"{name} missing"
    params = json.loads((repo / "metrics/params.json").read_text())
    assert params["total_params"] == 122_570
    parity = json.loads((repo / "metrics/parity.json").read_text())
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_diff"] <= 1e-5
    assert parity["images"] == 50
    test_acc = json.loads((repo / "metrics/eval.json").read_text())["test/acc"]

    run_id = json.loads((repo / "models/mlflow_run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    mlflow_run = client.get_run(run_id)
    metrics = mlflow_run.data.metrics
    expected = {"train/loss", "val/acc", "test/loss", "params/total", "parity/max_abs_diff"}
    assert expected | {"baseline/test/acc", "chapter/shift_agreement/cnn/shift1"} <= set(metrics)
    assert metrics["test/acc"] == pytest.approx(test_acc)
    assert mlflow_run.data.tags["mlflow.source.git.commit"] == commit
    (version,) = client.search_model_versions("name='cnnpipe-cifar10'")
    assert version.run_id == run_id
    props = {p.key: p.value for p in onnx.load(repo / "models/model.onnx").metadata_props}
    assert props["mlflow_run_id"] == run_id and props["git_commit"] == commit
    assert not (repo / "mlruns").exists(), "nothing in the deprecated file store"

    assert "Data and pipelines are up to date." in run("dvc", "repro")

    # DVC composes conf/ with the overrides through Hydra; only evaluate depends on the change.
    set_args = [arg for o in [*overrides, "evaluate.batch_size=25"] for arg in ("-S", o)]
    output = run("dvc", "exp", "run", *set_args)
    stages_run = [line for line in output.splitlines() if line.startswith("Running stage")]
    assert stages_run == ["Running stage 'evaluate':"]
    assert OmegaConf.load(repo / "params.yaml").evaluate.batch_size == 25
    exp_name = client.get_run(run_id).data.tags.get("dvc.exp_name")
    assert exp_name and exp_name in run("dvc", "exp", "list", "--name-only")

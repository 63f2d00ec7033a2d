import subprocess
import sys
from pathlib import Path

from cnnpipe.config import compose_params

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "cnnpipe.cli", *args], cwd=cwd, capture_output=True, text=True
    )


def test_user_errors_are_one_line_without_traceback(tmp_path):
    params = compose_params(
        ["data.url=/nonexistent/cifar-10-python.tar.gz"], conf_dir=ROOT / "conf"
    )
    (tmp_path / "params.yaml").write_text(params)
    result = run_cli("fetch", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("cnnpipe fetch: error: cannot read file:///nonexistent")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists()


def test_missing_checkpoint_names_the_stage_to_run(tmp_path):
    (tmp_path / "params.yaml").write_text(compose_params(conf_dir=ROOT / "conf"))
    result = run_cli("export", cwd=tmp_path)
    assert result.returncode == 1
    # The stage opens the training's MLflow run first: that is what is missing before training.
    assert result.stderr == (
        "cnnpipe export: error: no MLflow run recorded in models/mlflow_run.json; "
        "run `dvc repro train`\n"
    )


def test_unknown_command_prints_usage(tmp_path):
    result = run_cli("frobnicate", cwd=tmp_path)
    assert result.returncode == 1 and "usage: cnnpipe" in result.stderr

"""The one MLflow run that all stages of a pipeline run log into."""

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from cnnpipe import PipelineError
from cnnpipe.files import atomic_path


def repo_root() -> Path:
    """The user's repository, also from the temporary copy that `dvc exp run --queue` runs in."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(configured: str | None = None) -> str:
    """MLFLOW_TRACKING_URI, else the configured URI, else an sqlite file in the repository root."""
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or configured
        or f"sqlite:///{repo_root() / 'mlflow.db'}"
    )


def git_commit() -> str:
    """HEAD's commit, with "-dirty" when tracked files differ from it; "unknown" outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], capture_output=True).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """A store that is down, or an sqlite file locked past MLflow's 20 s wait, fails the stage in
    one line: a run that cannot be traced is not a pipeline result."""
    try:
        yield
    except MlflowException as error:
        reason = str(error).splitlines()[0][:300]
        raise PipelineError(
            f"MLflow store {mlflow.get_tracking_uri()} failed ({reason}); start the server or "
            "stop the process locking the database, then run again (MLFLOW_TRACKING_URI picks "
            "another store)"
        ) from None


def use_experiment(cfg: DictConfig) -> None:
    uri = tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.mlflow.experiment) is None and uri.startswith("sqlite:"):
        # Artifacts go beside the database, not into a ./mlruns folder of whatever cwd is.
        artifacts = Path(uri.removeprefix("sqlite:///")).with_name("mlartifacts")
        mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=artifacts.as_uri())
    mlflow.set_experiment(cfg.mlflow.experiment)


def _exp_tag() -> dict[str, str]:
    """Under `dvc exp run`, the experiment's name, to match MLflow runs with `dvc exp show`."""
    name = os.environ.get("DVC_EXP_NAME")
    return {"dvc.exp_name": name} if name else {}


def flatten(cfg: DictConfig) -> dict[str, str]:
    """{"optim.lr": "0.005", ...}: MLflow params are flat strings."""
    out = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def start_pipeline_run(
    cfg: DictConfig, run_file: Path, run_id: str | None = None, tags: dict | None = None
) -> str:
    """Start the pipeline's MLflow run (or reopen `run_id`, an interrupted one), log the
    configuration, record the run id in `run_file`."""
    tags = {"mlflow.source.git.commit": git_commit(), **_exp_tag(), **(tags or {})}
    with store_errors():
        use_experiment(cfg)
        with mlflow.start_run(run_id=run_id, tags=tags) as run:
            mlflow.log_params(flatten(cfg))
    with atomic_path(run_file) as tmp:
        tmp.write_text(json.dumps({"run_id": run.info.run_id}) + "\n")
    return run.info.run_id


def read_run_id(run_file: Path) -> str:
    try:
        return json.loads(Path(run_file).read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        raise PipelineError(
            f"no MLflow run recorded in {run_file}; run `dvc repro train`"
        ) from None


@contextlib.contextmanager
def pipeline_run(cfg: DictConfig, run_file: Path) -> Iterator[mlflow.ActiveRun]:
    """Reopen the run that the train stage started."""
    run_id = read_run_id(run_file)
    with store_errors():
        use_experiment(cfg)
        with mlflow.start_run(run_id=run_id) as run:
            mlflow.set_tags(_exp_tag())
            yield run

"""The MLflow store: where it is, which experiment, and its errors in one line each."""

import contextlib
import logging
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig
from sqlalchemy.exc import SQLAlchemyError

from cnnpipe import PipelineError


def quiet_mlflow() -> None:
    """MLflow's INFO lines (database migrations, the system metrics thread) say nothing to a
    person, its database module logs a traceback for each error that store_errors() reports in a
    line, and its links lead astray."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # With a server, MLflow prints its own "View run" and "View experiment" links, which open
    # in its GenAI views on an empty traces page; cnnpipe prints its own (ui_hint).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


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


# MLflow 3's UI opens an experiment on its GenAI views (traces, all empty here) unless the
# link asks for its Model training views.
MODEL_TRAINING = "workflowType=machine_learning"


def ui_link(experiment_id: str, run_id: str | None = None, base: str = "") -> str:
    """A link into the MLflow UI that opens on the experiment's runs (or on one run) in Model
    training mode: relative, for Markdown the UI renders, unless `base` is given."""
    path = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base.rstrip('/')}/{path}?{MODEL_TRAINING}" if base else f"{path}?{MODEL_TRAINING}"


def ui_hint(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """Where to see a run: a tracking server's own UI, or `mlflow ui` (port 5000) for a local
    store, with the command that starts it."""
    if uri.startswith(("http://", "https://")):
        return ui_link(experiment_id, run_id, uri)
    link = ui_link(experiment_id, run_id, "http://127.0.0.1:5000")
    return f"{link} (after: mlflow ui --backend-store-uri {uri})"


def answers(server: str) -> bool:
    """Whether the MLflow server at `server` answers its health check now."""
    try:
        with urllib.request.urlopen(f"{server}/health", timeout=5) as response:
            return response.status == 200
    except (OSError, ValueError):  # down, or not an http(s) URI
        return False


def store_problem(error: Exception, setting: str = "MLFLOW_TRACKING_URI") -> str:
    """What went wrong with a database, in words, and what to do; `setting` points elsewhere.
    Read from the error and the ones it came from (Optuna wraps SQLAlchemy's)."""
    causes, cause = [], error
    while cause is not None and len(causes) < 5:
        causes.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    text = " ".join(causes).lower()
    if "locked" in text:
        return (
            "the sqlite database is locked by another process (the wait for it ran out); wait "
            "for that process or stop it, then run again"
        )
    if "readonly" in text or "read-only" in text:
        return f"the store is read-only; make it writable or point {setting} elsewhere"
    if "disk is full" in text or "no space" in text:
        return "the disk is full; free some space, then run again"
    if "disk i/o error" in text:
        return "a disk I/O error (is the disk full or failing?); check it, then run again"
    # An upload through the server failed: it answered 500, or reset the connection as it
    # answered without reading the body. If the server still answers, its artifact store (a
    # bucket) refused or did not answer.
    if "mlflow-artifacts" in text and ("500 error" in text or answers(mlflow.get_tracking_uri())):
        return (
            "the server cannot store artifacts (it failed an upload and answers otherwise): check "
            "its --artifacts-destination (a bucket that is down, missing or refuses the server's "
            "credentials), then run again"
        )
    if "connection" in text or "max retries" in text or "refused" in text:
        return f"the server does not answer; start it or set {setting} to another store"
    # SQLAlchemy may open with a note on when the statement ran; the database's words follow.
    lines = [
        line.removeprefix("BAD_REQUEST: ").strip()
        for line in str(error).splitlines()
        if line.strip() and "Query-invoked autoflush" not in line
    ]
    first = lines[0][:200] if lines else repr(error)
    return f"{first}; fix the store or set {setting} to another one"


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """A store that is down, locked past MLflow's wait, read-only or full fails the stage in
    one line: a run that cannot be traced is not a pipeline result."""
    try:
        yield
    except (MlflowException, SQLAlchemyError, OSError) as error:
        # Only the store's own I/O is the store's problem; other files have their own errors.
        if type(error) is OSError and "database" not in str(error).lower():
            raise
        raise PipelineError(
            f"MLflow store {mlflow.get_tracking_uri()}: {store_problem(error)}"
        ) from None


def use_experiment(cfg: DictConfig) -> str:
    """Select the configured experiment, created on first use; returns its id."""
    quiet_mlflow()
    uri = tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:"):
            # Artifacts go beside the database, not into a ./mlruns folder of whatever cwd is.
            # (sqlite:///file:/path.db?mode=ro is SQLAlchemy's URI form of a database path.)
            database = uri.removeprefix("sqlite:///").removeprefix("file:").split("?")[0]
            location = Path(database).resolve().with_name("mlartifacts").as_uri()
        # The UI then opens the experiment on its runs, not on GenAI traces.
        tags = {"mlflow.experimentKind": "custom_model_development"}
        experiment_id = mlflow.create_experiment(cfg.mlflow.experiment, location, tags)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id

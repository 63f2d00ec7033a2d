"""The MLflow run of a pipeline run: name, params, lineage, results, and a status that is true."""

import contextlib
import json
import logging
import os
import socket
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import psutil
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import RunInfo
from mlflow.exceptions import MlflowException
from mlflow.types import Schema, TensorSpec
from omegaconf import DictConfig, OmegaConf
from sqlalchemy.exc import SQLAlchemyError

from cnnpipe import PipelineError
from cnnpipe.config import network_name
from cnnpipe.data import test_mask
from cnnpipe.files import atomic_path
from cnnpipe.prepared import Manifest, Prepared
from cnnpipe.schema import recipe

# What a person needs to follow a run, beside MLflow's own tags.
STAGE, FAILED_STAGE, ERROR = "cnnpipe.stage", "cnnpipe.failed_stage", "cnnpipe.error"
DIRTY = "git.dirty"
HOST, PID, PID_STARTED = "cnnpipe.host", "cnnpipe.pid", "cnnpipe.pid_started"
# The stages that have finished in a run, in order: "train,evaluate,...".
DONE = "cnnpipe.stages_done"


def quiet_mlflow() -> None:
    """MLflow's INFO lines (database migrations, the system metrics thread) say nothing to a
    person, and its database module logs a traceback for each error that store_errors() reports
    in a line."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


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


def git_commit() -> tuple[str, bool]:
    """HEAD's commit ("unknown" outside git), and whether the code or conf/ differ from it.

    params.yaml, dvc.lock and the stage outputs are left out: DVC changes them in every run, and
    the run records the configuration itself.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        code = ["src", "conf", "dvc.yaml", "pyproject.toml", "requirements.lock"]
        diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *code], capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, diff.returncode != 0


def source_tags(command: str, commit: str, dirty: bool) -> dict[str, str]:
    """The code a run ran: MLflow's source tags, and whether it differed from the commit."""
    return {
        "mlflow.source.git.commit": commit,
        DIRTY: str(dirty).lower(),
        "mlflow.source.name": command,
        "mlflow.source.type": "LOCAL",
    }


# Runs' names are a VARCHAR(250) in MLflow's database schema: PostgreSQL and MySQL refuse a longer
# one (sqlite does not check). A sweep named by its overrides can be longer.
NAME_LENGTH = 250


def short_name(name: str) -> str:
    """`name` as it fits in a run's name: cut to NAME_LENGTH characters, ending in "…"."""
    return name if len(name) <= NAME_LENGTH else name[: NAME_LENGTH - 1] + "…"


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


def flatten(node: object, prefix: str = "") -> dict:
    """{"optim": {"lr": 0.005}} -> {"optim.lr": 0.005}; lists stay values."""
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def recipe_params(cfg: DictConfig) -> dict[str, str]:
    """The recipe as MLflow params: {"optim.lr": "0.005", ...}, without paths and the like."""
    return {key: str(value) for key, value in flatten(recipe(cfg)).items()}


def run_link(experiment_id: str, run_id: str) -> str:
    """A link inside the MLflow UI, for Markdown that the UI renders (descriptions, artifacts)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def read_run_id(run_file: Path) -> str:
    try:
        return json.loads(Path(run_file).read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        raise PipelineError(
            f"no MLflow run recorded in {run_file}; run `dvc repro train`"
        ) from None


def write_run_file(run_file: Path, run_id: str) -> None:
    with atomic_path(run_file) as tmp:
        tmp.write_text(json.dumps({"run_id": run_id}) + "\n")


def process_tags() -> dict[str, str]:
    """Which process holds a RUNNING run, so the next run can tell a killed one from a live one."""
    me = psutil.Process()
    return {HOST: socket.gethostname(), PID: str(me.pid), PID_STARTED: str(me.create_time())}


def _alive(tags: dict) -> bool:
    try:
        return str(psutil.Process(int(tags[PID])).create_time()) == tags[PID_STARTED]
    except (KeyError, ValueError, psutil.Error):
        return False


def close_abandoned_runs(client: mlflow.MlflowClient, experiment_id: str, keep: str | None) -> None:
    """Mark KILLED the RUNNING runs of this machine whose process is gone (killed, or the machine
    went down): left as they are they would read RUNNING forever."""
    running = client.search_runs(
        [experiment_id],
        f"attributes.status = 'RUNNING' and tags.`{HOST}` = '{socket.gethostname()}'",
        max_results=1000,
    )
    for run in running:
        if run.info.run_id != keep and not _alive(run.data.tags):
            stage = run.data.tags.get(STAGE, "?")
            client.set_tag(run.info.run_id, FAILED_STAGE, stage)
            client.set_tag(run.info.run_id, ERROR, f"the {stage} process ended without finishing")
            client.set_terminated(run.info.run_id, "KILLED")


def describe(client: mlflow.MlflowClient, run_id: str) -> str:
    """The run's description: what it is, how it ended, the headline numbers."""
    run = client.get_run(run_id)
    tags, m = run.data.tags, run.data.metrics
    lines = []
    if run.info.status in ("FAILED", "KILLED"):
        stage = tags.get(FAILED_STAGE)
        lines += [f"**{run.info.status} in stage `{stage}`**: {tags.get(ERROR)}", ""]
    commit = tags.get("mlflow.source.git.commit", "unknown")[:10]
    dirty = " **with uncommitted changes** to the code or conf/"
    dirty = dirty if tags.get(DIRTY) == "true" else ""
    lines.append(f"Code: commit `{commit}`{dirty}. Last stage: `{tags.get(STAGE)}`.")
    headline = {
        "test.acc": ("test accuracy, as deployed", "{:.2%}"),
        "val/acc": ("validation accuracy", "{:.2%}"),
        "parity.max_abs_diff": ("ONNX vs PyTorch, largest difference", "{:.1e}"),
        "model.params": ("parameters", "{:,.0f}"),
        "train.seconds": ("training time", "{:,.0f} s"),
    }
    shown = [
        f"- {text}: **{form.format(m[key])}** (`{key}`)"
        for key, (text, form) in headline.items()
        if key in m
    ]
    if shown:
        lines += ["", *shown]
    return "\n".join(lines)


@contextlib.contextmanager
def stage_run(
    cfg: DictConfig,
    stage: str,
    *,
    new: bool = False,
    run_id: str | None = None,
    name: str | None = None,
    tags: dict | None = None,
    system_metrics: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """The MLflow run a stage works in, RUNNING while it works: FINISHED if the block completes,
    FAILED (naming the stage and the error) if it raises, KILLED on Ctrl-C.

    `new`: start a run (or reopen `run_id`, an interrupted one) and log the recipe; otherwise
    reopen the run recorded in `paths.run` by the train stage. A stage run again on a FINISHED
    run where it has finished before, that then fails, leaves the run FINISHED with its results,
    and records the failure as a run of its own under it (`failed_attempt`).
    """
    run_id = run_id if new else read_run_id(Path(cfg.paths.run))
    commit, dirty = git_commit()
    with store_errors():
        experiment_id = use_experiment(cfg)
        client = mlflow.MlflowClient()
        close_abandoned_runs(client, experiment_id, keep=run_id)
        before = client.get_run(run_id) if run_id else None
        done = before.data.tags.get(DONE, "").split(",") if before else []
        again = not new and stage in done and before.info.status == "FINISHED"
        all_tags = {STAGE: stage, **process_tags(), **(tags or {})}
        if exp_name := os.environ.get("DVC_EXP_NAME"):
            # Matches the run with `dvc exp show`.
            all_tags["dvc.exp_name"] = exp_name
        if new:
            all_tags |= source_tags(f"cnnpipe {stage}", commit, dirty)
        run = mlflow.start_run(
            run_id=run_id,
            run_name=None
            if run_id
            else short_name(name or exp_name or default_name(cfg, commit, dirty)),
            tags=all_tags,
            log_system_metrics=system_metrics,
        )
    # From here on the run is ours to end: whatever fails ends it FAILED (MLflow's exit hook
    # would end a run left open FINISHED).
    try:
        with store_errors():
            for key in (FAILED_STAGE, ERROR):
                if key in run.data.tags:
                    client.delete_tag(run.info.run_id, key)
            if new:
                mlflow.log_params(recipe_params(cfg))
            yield run
            mlflow.log_text(OmegaConf.to_yaml(cfg), "lineage/params.yaml")
            if os.environ.get("DVC_STAGE") and Path("dvc.lock").is_file():
                # As DVC left it after the stages before this one.
                mlflow.log_artifact("dvc.lock", "lineage")
            mlflow.set_tag(DONE, ",".join([s for s in done if s and s != stage] + [stage]))
            mlflow.set_tag("mlflow.note.content", describe(client, run.info.run_id))
            end(client, run.info.run_id, "FINISHED")
    except BaseException as error:
        # An error may say how its run ends (a pruned trial: KILLED, it did not finish).
        status = "FAILED" if isinstance(error, Exception) else "KILLED"
        status = getattr(error, "mlflow_status", status)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        with contextlib.suppress(Exception):  # the store itself may be what failed
            if again:
                end(client, run.info.run_id, "FINISHED")
                failed_attempt(client, run.info, stage, status, message)
            else:
                mlflow.set_tags({FAILED_STAGE: stage, ERROR: message[:500]})
                end(client, run.info.run_id, status)
                note = describe(client, run.info.run_id)
                client.set_tag(run.info.run_id, "mlflow.note.content", note)
        raise


def failed_attempt(
    client: mlflow.MlflowClient, parent: RunInfo, stage: str, status: str, message: str
) -> None:
    """A failed re-run of `stage` as a run of its own under the run whose results it would have
    replaced, which keeps them and its status."""
    note = f"**{status} in stage `{stage}`**: {message}\n\nThe results of the run above are kept."
    attempt = client.create_run(
        parent.experiment_id,
        run_name=f"{stage} failed",
        tags={
            "mlflow.parentRunId": parent.run_id,
            STAGE: stage,
            FAILED_STAGE: stage,
            ERROR: message[:500],
            "mlflow.note.content": note,
        },
    )
    client.set_terminated(attempt.info.run_id, status)


def end(client: mlflow.MlflowClient, run_id: str, status: str) -> None:
    """End the active run; the process tags are only needed while it runs."""
    for key in (HOST, PID, PID_STARTED):
        client.delete_tag(run_id, key)
    mlflow.end_run(status)


def default_name(cfg: DictConfig, commit: str, dirty: bool) -> str:
    """Such as `ChapterCNN 35 epochs @f5b2a33`, with `+dirty` when the code differs from it."""
    name = f"{network_name(cfg.model)} {cfg.trainer.max_epochs} epochs"
    if commit == "unknown":
        return name
    return f"{name} @{commit[:7]}{'+dirty' if dirty else ''}"


def record(path: str | Path, metrics: dict, curves: tuple[str, ...] = ()) -> None:
    """A stage's result: `metrics` to the JSON file at `path` and, under the same names, to the
    active MLflow run. `curves` are keys the run already has per epoch (the JSON holds their
    final value), logged once, not again."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    if mlflow.active_run():
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if k not in curves})


def mlflow_dataset(prepared: Prepared, rows: np.ndarray | None = None) -> MetaDataset:
    """The prepared data by content, as an MLflow dataset with the source the prepare stage read
    and the images' shape as its schema: every image (named data.name, what training reads), or
    `rows` of it."""
    manifest = prepared.manifest
    with warnings.catch_warnings():
        # MLflow registers its local-file source class twice and warns that it is ambiguous.
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
        source = resolve_dataset_source(manifest.source)
    size = manifest.image_size
    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3), "images")])
    name = manifest.name if rows is None else f"{manifest.name}-test"
    return MetaDataset(source, name, manifest.digest(rows), schema)


def scored_dataset(cfg: DictConfig) -> MetaDataset:
    """The test split as an MLflow dataset ("<name>-test"): what the models are scored on."""
    prepared = Prepared.open(cfg.paths.data)
    return mlflow_dataset(prepared, np.flatnonzero(test_mask(prepared, cfg.data, cfg.seed)[0]))


def dataset_tags(manifest: Manifest) -> dict[str, str]:
    """What a run's training input says of the data beside its digest: size and class counts."""
    return {
        "image_size": f"{manifest.image_size}x{manifest.image_size}",
        "images": str(len(manifest.files)),
        "class_counts": json.dumps(manifest.class_counts()),
    }


# The step a logged model is recorded at in its run: one no metric has, since MLflow links every
# metric of the run at the model's step to it (the system metrics' first sample, the summary of
# every stage), where only the model's own results belong.
MODEL_STEP = -1


def log_onnx_model(
    path: Path,
    name: str,
    registered_name: str,
    description: str,
    example: tuple[np.ndarray, np.ndarray],
    results: dict[str, float],
    dataset: MetaDataset,
) -> str:
    """Log the ONNX file at `path` to the active run as `name` with MLflow's ONNX flavour, an
    (input, output) `example` for its signature and its `results` on `dataset` as its metrics,
    and register it as a new version of `registered_name` described by `description`
    (Markdown); returns the version. `results` are logged to the run too, so they must be the
    values the run has under those names."""
    import onnx
    from mlflow.models import infer_signature

    info = mlflow.onnx.log_model(
        onnx.load(path),
        name=name,
        registered_model_name=registered_name,
        signature=infer_signature(*example),
        input_example=example[0],
        save_as_external_data=False,
        onnx_execution_providers=["CPUExecutionProvider"],
        step=MODEL_STEP,
    )
    mlflow.log_metrics(results, model_id=info.model_id, dataset=dataset)
    version = str(info.registered_model_version)
    mlflow.MlflowClient().update_model_version(registered_name, version, description)
    return version

"""The MLflow run a stage works in: opened or reopened, RUNNING while the stage works, and
ended with a status that is true, its failures named."""

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.entities import RunInfo
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from cnnpipe import PipelineError
from cnnpipe.base import processes
from cnnpipe.base.config import network_name, output_roots
from cnnpipe.base.files import atomic_path, remove_leftovers
from cnnpipe.tracking.lineage import DIRTY, git_commit, recipe_params, source_tags
from cnnpipe.tracking.probe import check_artifacts
from cnnpipe.tracking.store import store_errors, ui_hint, use_experiment

# The tag `cnnpipe share` puts on each copy: the id of the run it was copied from.
COPIED_FROM = "cnnpipe.copied_from"

# What a person needs to follow a run, beside MLflow's own tags.
STAGE, FAILED_STAGE, ERROR = "cnnpipe.stage", "cnnpipe.failed_stage", "cnnpipe.error"
HOST, PID, PID_STARTED = "cnnpipe.host", "cnnpipe.pid", "cnnpipe.pid_started"
# On a FINISHED run while one of its stages runs again: the stage.
RERUN = "cnnpipe.rerun"
# The stages that have finished in a run, in order: "train,evaluate,...".
DONE = "cnnpipe.stages_done"


# Runs' names are a VARCHAR(250) in MLflow's database schema: PostgreSQL and MySQL refuse a longer
# one (sqlite does not check). A sweep named by its overrides can be longer.
NAME_LENGTH = 250


def short_name(name: str) -> str:
    """`name` as it fits in a run's name: cut to NAME_LENGTH characters, ending in "…"."""
    return name if len(name) <= NAME_LENGTH else name[: NAME_LENGTH - 1] + "…"


def default_name(cfg: DictConfig, commit: str, dirty: bool) -> str:
    """Such as `ChapterCNN 18 epochs @f5b2a33`, with `+dirty` when the code differs from it."""
    name = f"{network_name(cfg.model)} {cfg.trainer.max_epochs} epochs"
    if commit == "unknown":
        return name
    return f"{name} @{commit[:7]}{'+dirty' if dirty else ''}"


def read_run_id(run_file: Path) -> str:
    try:
        return json.loads(Path(run_file).read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        raise PipelineError(
            f"no MLflow run recorded in {run_file}; run `dvc repro train`"
        ) from None


def write_run_file(run_file: Path, run_id: str) -> None:
    """The run's id, and the store it was logged to: where to copy it from (`cnnpipe share`)."""
    with atomic_path(run_file) as tmp:
        tmp.write_text(json.dumps({"run_id": run_id, "store": mlflow.get_tracking_uri()}) + "\n")


def located(client: mlflow.MlflowClient, run_file: Path, experiment_id: str) -> str:
    """The run `run_file` records, in this store: itself, or its copy (`cnnpipe share` tags it
    with the id it came from); else a PipelineError that names both stores."""
    run_id = read_run_id(run_file)
    try:
        client.get_run(run_id)
        return run_id
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    filter_string = f"tags.`{COPIED_FROM}` = '{run_id}'"
    if copies := client.search_runs([experiment_id], filter_string=filter_string):
        return copies[0].info.run_id
    here = mlflow.get_tracking_uri()
    recorded = json.loads(run_file.read_text()).get("store", "another store")
    raise PipelineError(
        f"the run {run_id} that {run_file} records is not in {here}, nor a copy of it: it was "
        f"logged to {recorded}; copy it here with `cnnpipe share --from {recorded} --to {here}`, "
        "or train again with `dvc repro -f train`"
    )


def process_tags() -> dict[str, str]:
    """Which process holds a RUNNING run, so the next run can tell a killed one from a live one."""
    host, pid, started = processes.me()
    return {HOST: host, PID: str(pid), PID_STARTED: str(started)}


def abandoned(tags: dict) -> bool:
    """Whether the process that holds a RUNNING run with these tags, of this machine, is gone."""
    try:
        return not processes.alive(int(tags[PID]), float(tags[PID_STARTED]))
    except (KeyError, ValueError):
        return True


def close_abandoned_runs(client: mlflow.MlflowClient, experiment_id: str) -> int:
    """Tell the truth about runs whose stage process of this machine is gone (killed, or the
    machine went down): a RUNNING run reads KILLED; a finished run that a stage was re-running
    keeps its status and results, with the killed attempt as a run under it. Another machine's
    runs are left to that machine's next cnnpipe command: only it can tell. Returns how many."""
    held = client.search_runs(
        [experiment_id], f"tags.`{HOST}` = '{socket.gethostname()}'", max_results=1000
    )
    closed = 0
    for run in held:
        status, tags = run.info.status, run.data.tags
        # Process tags left on a run that no stage re-ran (a sweep's parent, say) say nothing.
        rerun = tags.get(RERUN) if status != "RUNNING" else None
        if (status != "RUNNING" and not rerun) or not abandoned(tags):
            continue
        run_id, stage = run.info.run_id, rerun or tags.get(STAGE, "?")
        message = f"the {stage} process ended without finishing"
        drop_process_tags(client, run_id)
        if not rerun:
            client.set_tag(run_id, FAILED_STAGE, stage)
            client.set_tag(run_id, ERROR, message)
            client.set_terminated(run_id, "KILLED")
            client.set_tag(run_id, "mlflow.note.content", run_note(client, run_id))
        else:
            failed_attempt(client, run.info, stage, "KILLED", message)
        closed += 1
    return closed


def run_note(client: mlflow.MlflowClient, run_id: str) -> str:
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
    run_file = None if new else Path(cfg.paths.run)
    if run_file:
        read_run_id(run_file)  # a missing record is said before the store is opened
    remove_leftovers(output_roots(cfg))
    with store_errors():
        experiment_id = use_experiment(cfg)
        client = mlflow.MlflowClient()  # of the store use_experiment selected
        run_id = located(client, run_file, experiment_id) if run_file else run_id
        before = open_run(cfg, client, experiment_id, run_id, stage, name, tags, new)
        run = mlflow.start_run(
            run_id=run_id,
            run_name=before["run_name"],
            tags=before["tags"],
            log_system_metrics=system_metrics,
        )
    done, again = before["done"], before["again"]
    if again:
        # A finished run whose stage runs again keeps its results, and so its status, until
        # new ones replace them: a killed re-run leaves it FINISHED, as it was, with the attempt
        # recorded under it (close_abandoned_runs).
        client.update_run(run.info.run_id, "FINISHED")
    # From here on the run is ours to end: whatever fails ends it FAILED (MLflow's exit hook
    # would end a run left open FINISHED).
    try:
        check_artifacts(run.info.artifact_uri)
        with store_errors():
            for key in (FAILED_STAGE, ERROR):
                if key in run.data.tags:
                    client.delete_tag(run.info.run_id, key)
            if new:
                mlflow.log_params(recipe_params(cfg))
            yield run
            finish(cfg, client, run.info.run_id, stage, done)
    except BaseException as error:
        with contextlib.suppress(Exception):  # the store itself may be what failed
            fail(client, run.info, stage, error, again)
        raise
    print("MLflow:", ui_hint(mlflow.get_tracking_uri(), run.info.experiment_id, run.info.run_id))


def open_run(
    cfg: DictConfig,
    client: mlflow.MlflowClient,
    experiment_id: str,
    run_id: str | None,
    stage: str,
    name: str | None,
    tags: dict | None,
    new: bool,
) -> dict:
    """Before a stage's run starts: abandoned runs closed, and the run's name (None for a run
    that exists), tags, finished stages, and whether this stage finished in it before
    (`again`)."""
    commit, dirty = git_commit()
    # Before this stage reopens a run that a killed process left, so that it is on record.
    close_abandoned_runs(client, experiment_id)
    before = client.get_run(run_id) if run_id else None
    done = before.data.tags.get(DONE, "").split(",") if before else []
    again = not new and stage in done and before.info.status == "FINISHED"
    all_tags = {STAGE: stage, **process_tags(), **(tags or {})}
    if again:
        all_tags[RERUN] = stage
    if exp_name := os.environ.get("DVC_EXP_NAME"):
        # Matches the run with `dvc exp show`.
        all_tags["dvc.exp_name"] = exp_name
    if new:
        all_tags |= source_tags(f"cnnpipe {stage}", commit, dirty)
    return {
        "run_name": None
        if run_id
        else short_name(name or exp_name or default_name(cfg, commit, dirty)),
        "tags": all_tags,
        "done": done,
        "again": again,
    }


def finish(
    cfg: DictConfig, client: mlflow.MlflowClient, run_id: str, stage: str, done: list[str]
) -> None:
    """The stage's lineage and place in the run, its note, and the run ended FINISHED."""
    mlflow.log_text(OmegaConf.to_yaml(cfg), "lineage/params.yaml")
    if os.environ.get("DVC_STAGE") and Path("dvc.lock").is_file():
        # As DVC left it after the stages before this one.
        mlflow.log_artifact("dvc.lock", "lineage")
    mlflow.set_tag(DONE, ",".join([s for s in done if s and s != stage] + [stage]))
    mlflow.set_tag("mlflow.note.content", run_note(client, run_id))
    end(client, run_id, "FINISHED")


def fail(
    client: mlflow.MlflowClient, run: RunInfo, stage: str, error: BaseException, again: bool
) -> None:
    """End the run as `error` says: FAILED, KILLED for Ctrl-C, or the error's own `mlflow_status`
    (a pruned trial: KILLED, it did not finish). A failed re-run (`again`) of a finished stage
    keeps the run FINISHED and records the attempt under it."""
    status = "FAILED" if isinstance(error, Exception) else "KILLED"
    status = getattr(error, "mlflow_status", status)
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    if again:
        end(client, run.run_id, "FINISHED")
        failed_attempt(client, run, stage, status, message)
    else:
        mlflow.set_tags({FAILED_STAGE: stage, ERROR: message[:500]})
        end(client, run.run_id, status)
        client.set_tag(run.run_id, "mlflow.note.content", run_note(client, run.run_id))


def failed_attempt(
    client: mlflow.MlflowClient, parent: RunInfo, stage: str, status: str, message: str
) -> None:
    """A failed re-run of `stage` as a run of its own under the run whose results it would have
    replaced, which keeps them and its status."""
    note = f"**{status} in stage `{stage}`**: {message}\n\nThe results of the run above are kept."
    attempt = client.create_run(
        parent.experiment_id,
        run_name=f"{stage} {status.lower()}",
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
    drop_process_tags(client, run_id)
    mlflow.end_run(status)


def drop_process_tags(client: mlflow.MlflowClient, run_id: str) -> None:
    tags = client.get_run(run_id).data.tags
    for key in (HOST, PID, PID_STARTED, RERUN):
        if key in tags:
            client.delete_tag(run_id, key)


def record(path: str | Path, metrics: dict, curves: tuple[str, ...] = ()) -> None:
    """A stage's result: `metrics` to the JSON file at `path` and, under the same names, to the
    active MLflow run, numbers as metrics and words (a decision, a version) as tags. `curves` are
    keys the run already has per epoch (the JSON holds their final value), logged once, not
    again."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")

    if mlflow.active_run():
        words = {k: v for k, v in metrics.items() if isinstance(v, str)}
        numbers = {k: float(v) for k, v in metrics.items() if k not in curves and k not in words}
        mlflow.log_metrics(numbers)
        mlflow.set_tags(words)

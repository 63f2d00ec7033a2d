"""`cnnpipe runs`: the latest MLflow runs, or one sweep's child runs, as a table in the terminal.

Reads the store that the pipeline writes to (MLFLOW_TRACKING_URI, else mlflow.tracking_uri, else
sqlite:///<repo>/mlflow.db) through MLflow's client; `mlflow ui` shows the same runs as charts.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

from cnnpipe import PipelineError
from cnnpipe.base.args import COUNT, Parser
from cnnpipe.base.config import load_params, network_name, output_roots
from cnnpipe.base.files import remove_leftovers

if TYPE_CHECKING:
    import mlflow
    from mlflow.entities import Run

COLUMNS = {
    "model": lambda r: network_name(r.data.params.get("model._target_", "")),
    "lr": lambda r: r.data.params.get("optim.lr", ""),
    "epochs": lambda r: r.data.params.get("trainer.max_epochs", ""),
    "val/acc": lambda r: _metric(r, "val/acc", ".4f"),
    "test.acc": lambda r: _metric(r, "test.acc", ".4f"),
    "train s": lambda r: _metric(r, "train.seconds", ".0f"),
}


def _metric(run: Run, key: str, fmt: str) -> str:
    return f"{run.data.metrics[key]:{fmt}}" if key in run.data.metrics else ""


def find_runs(client: mlflow.MlflowClient, experiment: str, last: int, sweep: str | None) -> list:
    """The `last` newest runs of `experiment`, or the children of sweep run `sweep` ("latest":
    the newest sweep)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise PipelineError(f"no MLflow experiment {experiment!r} in {client.tracking_uri}")
    ids, newest = [found.experiment_id], ["attributes.start_time DESC"]
    query = ""
    if sweep == "latest":
        parents = client.search_runs(ids, "tags.`sweep.dir` != ''", max_results=1, order_by=newest)
        if not parents:
            raise PipelineError("no sweep runs yet; start one with `cnnpipe train --multirun ...`")
        sweep = parents[0].info.run_id
    if sweep:
        query = f"tags.mlflow.parentRunId = '{sweep}'"
    return client.search_runs(ids, query, max_results=last, order_by=newest)


def close_dead_runs(client: mlflow.MlflowClient, experiment: str) -> str | None:
    """Close the RUNNING runs of this machine whose process is gone, so that the table is true;
    on a store that cannot be written, the line that says why they still read RUNNING there."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    from cnnpipe.tracking.stage_run import close_abandoned_runs
    from cnnpipe.tracking.store import store_problem

    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    try:
        close_abandoned_runs(client, found.experiment_id)
    except (MlflowException, SQLAlchemyError, OSError) as error:
        return (
            "KILLED*: the run's process is gone, but the store still says RUNNING: "
            + store_problem(error)
        )
    return None


def status(run: Run) -> str:
    """The run's status; KILLED* where it reads RUNNING but its process of this machine is gone
    (a store that cannot be written keeps it so)."""
    from cnnpipe.tracking.stage_run import HOST, abandoned

    here = run.data.tags.get(HOST) == socket.gethostname()
    if run.info.status == "RUNNING" and here and abandoned(run.data.tags):
        return "KILLED*"
    return run.info.status


def format_table(runs: list) -> str:
    header = ["run", "started", "status", *COLUMNS, "name"]
    rows = [
        [
            run.info.run_id[:8],
            time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1000)),
            status(run),
            *(cell(run) for cell in COLUMNS.values()),
            run.info.run_name,
        ]
        for run in runs
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in [header, *rows])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="cnnpipe runs", description=__doc__)
    parser.add_argument("--last", type=COUNT, default=20, help="how many runs (default 20)")
    parser.add_argument("--sweep", help="a sweep's parent run id, or 'latest'")
    args = parser.parse_args(argv)
    cfg = load_params()
    import mlflow

    from cnnpipe.tracking.store import quiet_mlflow, store_errors, tracking_uri

    # What a crash left, cleaned as by any stage: this is the command to run after one.
    remove_leftovers(output_roots(cfg))
    quiet_mlflow()
    client = mlflow.MlflowClient(tracking_uri(cfg.mlflow.tracking_uri))
    with store_errors():
        unclosed = close_dead_runs(client, cfg.mlflow.experiment)
        runs = find_runs(client, cfg.mlflow.experiment, args.last, args.sweep)
    print(format_table(runs))
    if unclosed and any(status(run) == "KILLED*" for run in runs):
        print(unclosed)

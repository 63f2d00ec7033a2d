"""`cnnpipe train [--multirun] key=value ...`: training jobs composed by Hydra from conf/, outside
DVC. Each job trains and tests into its own folder under sweeps/ (git- and DVC-ignored) and logs
an MLflow run; under --multirun every job is a child of one parent run for the sweep, which
ends with a summary table. Launchers are Hydra's: hydra/launcher=joblib for parallel jobs on
this machine, hydra/launcher=slurm for a cluster.
"""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from cnnpipe import PipelineError
from cnnpipe.base.config import CONF_DIR, outputs_under
from cnnpipe.base.schema import validate

# Set by the sweep's callback before any job starts; launchers pass the environment to their
# workers (joblib's processes, SLURM jobs), so every job finds its parent without a race.
PARENT_ENV = "CNNPIPE_SWEEP_PARENT_RUN"
# The keys the sweep varies, so each job's run is named by its values of those alone.
VARIED_ENV = "CNNPIPE_SWEEP_VARIED"
# The summary's metric columns and their formats.
SUMMARY = {"val/acc": ".4f", "test.acc": ".4f", "train.seconds": ".1f"}


def job(cfg: DictConfig) -> dict:
    """One Hydra job: train and test `cfg` with every output in the job's own folder."""
    try:
        return train_and_test(cfg)
    except PipelineError as error:
        if HydraConfig.get().mode == RunMode.RUN:
            # Past Hydra's own reporting, which would add a line on HYDRA_FULL_ERROR.
            sys.exit(f"cnnpipe train: error: {error}")
        # A sweep's other jobs go on; Hydra prints this kind as one line, not a traceback.
        raise CompactHydraException(f"cnnpipe train: error: {error}") from None


def train_and_test(cfg: DictConfig) -> dict:
    """A grid job trains and tests; a search's trial trains with pruning and is never tested."""
    hc = HydraConfig.get()
    cfg = outputs_under(validate(cfg), hc.runtime.output_dir)
    import mlflow

    from cnnpipe.experiments import search
    from cnnpipe.tracking.stage_run import stage_run, write_run_file
    from cnnpipe.training.evaluation import evaluate, log_evaluation
    from cnnpipe.training.fit import log_training, train

    overrides = " ".join(hc.overrides.task) or "(defaults)"
    tags = {"sweep.overrides": overrides}
    name = overrides
    if hc.mode == RunMode.MULTIRUN and os.environ.get(PARENT_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
        varied = os.environ.get(VARIED_ENV, "").split(",")
        name = " ".join(o for o in hc.overrides.task if o.partition("=")[0] in varied) or name
    trial = None
    if search.is_search(hc):
        with search.study_errors(hc.sweeper, cfg.mlflow.tracking_uri):
            trial = search.job_trial(hc, cfg.mlflow.tracking_uri)
    callbacks = ()
    if trial:
        name, callbacks = search.trial_name(trial), (search.Pruning(trial),)
        tags |= {"optuna.trial": str(trial.number), "optuna.study": trial.study.study_name}
    with stage_run(cfg, "train", new=True, name=name, tags=tags) as run:
        metrics = train(cfg, run.info.run_id, callbacks)
        log_training(cfg, metrics)
        if trial:
            mlflow.set_tag("optuna.state", "COMPLETE")
        else:
            test = evaluate(cfg)
            log_evaluation(cfg, test)
    write_run_file(Path(cfg.paths.run), run.info.run_id)
    if trial:
        print(f"[{name}] val/acc {metrics['val/acc']:.4f}")
        return {"val/acc": metrics["val/acc"]}
    print(f"[{overrides}] val/acc {metrics['val/acc']:.4f} test.acc {test['test.acc']:.4f}")
    return {"val/acc": metrics["val/acc"], "test.acc": test["test.acc"]}


def summary_table(children: list, links: bool = False) -> str:
    """Markdown: one row per child run (named by what the sweep varied), best validation
    accuracy first, with `links` to the runs in the MLflow UI."""
    from cnnpipe.tracking.store import ui_link

    lines = [
        "| overrides | val/acc | test.acc | train s | status | run |",
        "|---|---:|---:|---:|---|---|",
    ]
    for run in sorted(children, key=lambda r: -r.data.metrics.get("val/acc", -1)):
        m = run.data.metrics
        cells = [f"{m[k]:{f}}" if k in m else "-" for k, f in SUMMARY.items()]
        # A pruned trial's run is KILLED: it did not finish.
        status = run.data.tags.get("optuna.state", run.info.status)
        link = run.info.run_id
        if links:
            link = f"[{link}]({ui_link(run.info.experiment_id, run.info.run_id)})"
        lines.append(f"| {run.info.run_name} | {' | '.join(cells)} | {status} | {link} |")
    return "\n".join(lines)


def swept_keys(overrides: list[str]) -> list[str]:
    """The keys a sweep varies: `optim.lr=1e-3,3e-3 model=a,b seed=1` -> ["optim.lr", "model"]."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o.get_key_element() for o in parsed if o.is_sweep_override()]


class ParentRun(Callback):
    """The sweep's MLflow parent run: created before the first job, closed with a summary."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            self.open_parent(config)
        except PipelineError as error:
            # Hydra turns a callback's exception into a warning and carries on without the
            # parent; the sweep must stop, in one line.
            sys.exit(f"cnnpipe train: error: {error}")

    def open_parent(self, config: DictConfig) -> None:
        import mlflow
        from mlflow.entities import Param

        from cnnpipe.experiments import search
        from cnnpipe.tracking.lineage import git_commit, recipe_params, source_tags
        from cnnpipe.tracking.stage_run import STAGE, process_tags, short_name
        from cnnpipe.tracking.store import store_errors, use_experiment

        experiment_id = use_experiment(config)
        overrides = list(config.hydra.overrides.task)
        varied = swept_keys(overrides)
        sweeper = search.resolve_sweeper(config) if search.is_search(config.hydra) else None
        if sweeper:
            varied += [key for key in sweeper.params if key not in varied]
            with search.study_errors(sweeper, config.mlflow.tracking_uri):
                study = search.open_study(sweeper, config.mlflow.tracking_uri)
            # A rerun that continues the study continues its parent run too.
            if previous := search.remembered_parent(study):
                with store_errors():
                    client = mlflow.MlflowClient()
                    client.update_run(previous, status="RUNNING")
                    for key, value in process_tags().items():
                        client.set_tag(previous, key, value)
                os.environ[PARENT_ENV] = previous
                os.environ[VARIED_ENV] = ",".join(varied)
                print(f"search parent run {previous}, continued")
                return
        kind = f"search {sweeper.study_name}" if sweeper else "sweep"
        tags = {
            "mlflow.runName": short_name(f"{kind}: {' '.join(overrides)}"),
            "sweep.dir": str(config.hydra.sweep.dir),
            **source_tags("cnnpipe train --multirun", *git_commit()),
            STAGE: "sweep",
            **process_tags(),
        }
        # The base recipe every job shares; the varied keys are in the children.
        base = {
            key: value
            for key, value in recipe_params(config).items()
            if not any(key == v or key.startswith(f"{v}.") for v in varied)
        }
        base["sweep.varied"] = ", ".join(varied)
        if sweeper:
            base |= search.parent_params(sweeper)
        with store_errors():
            client = mlflow.MlflowClient()
            run = client.create_run(experiment_id, tags=tags)
            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in base.items()])
        os.environ[PARENT_ENV] = run.info.run_id
        os.environ[VARIED_ENV] = ",".join(varied)
        print(f"{kind} parent run {run.info.run_id}")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        close_sweep("FINISHED")


def close_sweep(status: str) -> None:
    """Log the summary table to the parent run, tag the best child, end with `status`."""
    import mlflow

    from cnnpipe.tracking.store import store_errors

    parent = os.environ.pop(PARENT_ENV)
    os.environ.pop(VARIED_ENV, None)
    client = mlflow.MlflowClient()
    with store_errors():
        experiment = client.get_run(parent).info.experiment_id
        children = client.search_runs(
            [experiment], f"tags.mlflow.parentRunId = '{parent}'", max_results=10_000
        )
        table = summary_table(children, links=True)
        client.log_text(parent, table + "\n", "sweep_summary.md")
        finished = [c for c in children if c.info.status == "FINISHED"]
        # A search has named its best trial (the study breaks ties its own way).
        best_trial = client.get_run(parent).data.tags.get("search.best_trial")
        ranked = [c for c in finished if c.data.tags.get("optuna.trial") == best_trial]
        if finished:
            best = (ranked or [max(finished, key=lambda c: c.data.metrics["val/acc"])])[0]
            client.set_tag(best.info.run_id, "sweep.best", "true")
            client.set_tag(parent, "sweep.best_run", best.info.run_id)
            client.log_metric(parent, "best/val/acc", best.data.metrics["val/acc"])
        note = f"{len(children)} runs, best validation accuracy first:\n\n{table}"
        client.set_tag(parent, "mlflow.note.content", note)
        client.set_terminated(parent, status)
    table = summary_table(children)
    print(f"\nsweep {parent}: {len(children)} runs, best validation accuracy first\n{table}")


def main(argv: list[str]) -> None:
    sys.argv = ["cnnpipe train", *argv]
    run = hydra.main(str(CONF_DIR.resolve()), "config", version_base=None)(job)
    try:
        run()
    finally:
        # Hydra skips on_multirun_end when a job failed: the parent still gets its table.
        if PARENT_ENV in os.environ:
            close_sweep("FAILED")

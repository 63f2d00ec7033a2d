"""Hyperparameter search with Optuna: the search space in Hydra's override syntax, the study in a
database, pruning inside each trial's training, and the search's report in MLflow. The Hydra
sweeper that drives a search is hydra_plugins/cnnpipe_optuna (`hparams_search=<name>`)."""

import contextlib
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import mlflow
import optuna
import pytorch_lightning as pl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from sqlalchemy.exc import SQLAlchemyError

from cnnpipe import PipelineError
from cnnpipe.tracking import store as mlflow_store

SWEEPER = "hydra_plugins.cnnpipe_optuna.optuna_sweeper.OptunaSweeper"
# Validation accuracy, never test: the test set judges the search's result, not its steps.
OBJECTIVE = "val/acc"
PARENT_ATTR = "mlflow_parent_run"


def is_search(hydra_cfg: DictConfig) -> bool:
    return hydra_cfg.sweeper.get("_target_") == SWEEPER


def distribution(override: Override) -> BaseDistribution:
    """`choice(a, b)`, `range(lo, hi[, step])` (hi excluded, as Hydra has it), `interval(lo, hi)`
    and `tag(log, interval(lo, hi))` as Optuna distributions."""
    value = override.value()
    if override.is_choice_sweep():
        return CategoricalDistribution(list(value.list))
    if override.is_range_sweep():
        bounds = (value.start, value.stop, value.step)
        if all(isinstance(b, int) for b in bounds):
            return IntDistribution(value.start, value.stop - value.step, step=value.step)
        return FloatDistribution(value.start, value.stop - value.step, step=value.step)
    if override.is_interval_sweep():
        return FloatDistribution(value.start, value.end, log="log" in value.tags)
    raise PipelineError(f"{override.input_line}: a search takes choice, range or interval")


def search_space(
    params: dict[str, str], arguments: list[str]
) -> tuple[dict[str, BaseDistribution], list[str]]:
    """The distributions to sample, from the sweeper's `params` and the command line's sweep
    overrides, and the command line's plain overrides, which every trial gets (and which take
    a key out of the search)."""
    parser = OverridesParser.create()
    space, fixed = {}, []
    searched = parser.parse_overrides([f"{key}={value}" for key, value in params.items()])
    for override in searched + parser.parse_overrides(arguments):
        key = override.get_key_element()
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            space.pop(key, None)
            fixed.append(override.input_line)
    return space, fixed


def storage_spec(spec: str | DictConfig | None, tracking_uri: str | None) -> str | DictConfig:
    """The study's database: by default optuna.db beside an sqlite MLflow store (else in the
    working folder); any SQLAlchemy URL; or a Hydra node, e.g. Optuna's JournalStorage."""
    if spec is None:
        uri = mlflow_store.tracking_uri(tracking_uri)
        sqlite = uri.startswith("sqlite:///")
        beside = Path(uri.removeprefix("sqlite:///")).parent if sqlite else Path()
        spec = f"sqlite:///{(beside / 'optuna.db').resolve()}"
    return spec


def storage(spec: str | DictConfig | None, tracking_uri: str | None) -> optuna.storages.BaseStorage:
    spec = storage_spec(spec, tracking_uri)
    return optuna.storages.get_storage(spec if isinstance(spec, str) else instantiate(spec))


@contextlib.contextmanager
def study_errors(sweeper: DictConfig, tracking_uri: str | None) -> Iterator[None]:
    """A study database that is locked, read-only, full or down fails the search in one line."""
    try:
        yield
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
        spec = storage_spec(sweeper.storage, tracking_uri)
        where = spec if isinstance(spec, str) else spec.get("_target_")
        problem = mlflow_store.store_problem(error, "hydra.sweeper.storage")
        raise PipelineError(f"Optuna storage {where}: {problem}") from None


def open_study(sweeper: DictConfig, tracking_uri: str | None) -> optuna.Study:
    """The search's study, created on first use and continued after that."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=sweeper.study_name,
        storage=storage(sweeper.storage, tracking_uri),
        pruner=instantiate(sweeper.pruner),
        direction="maximize",
        load_if_exists=True,
    )
    sampler = OmegaConf.to_container(sweeper.sampler)
    if sampler.get("seed") is not None:
        # A continued search seeded as the first one was would draw the same values again.
        sampler["seed"] += len(study.trials)
    study.sampler = instantiate(sampler)
    return study


def job_trial(hydra_cfg: DictConfig, tracking_uri: str | None) -> optuna.Trial:
    """The trial a search's job trains: the sweeper numbers each job as its trial."""
    sweeper = hydra_cfg.sweeper
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = storage(sweeper.storage, tracking_uri)
    study = optuna.load_study(
        study_name=sweeper.study_name, storage=store, pruner=instantiate(sweeper.pruner)
    )
    study_id = store.get_study_id_from_name(sweeper.study_name)
    return optuna.Trial(
        study, store.get_trial_id_from_study_id_trial_number(study_id, hydra_cfg.job.num)
    )


def trial_name(trial: optuna.Trial) -> str:
    values = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in
                      trial.params.items())  # fmt: skip
    return f"trial {trial.number}: {values}"


class Pruned(optuna.TrialPruned):
    """A trial the pruner stopped: its MLflow run ends KILLED (it did not finish), tagged PRUNED."""

    mlflow_status = "KILLED"


class Pruning(pl.Callback):
    """Reports val/acc to the trial after every epoch and stops the training when the study's
    pruner says the trial is not worth finishing."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        epoch, value = trainer.current_epoch + 1, float(trainer.callback_metrics[OBJECTIVE])
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            pruner = type(self.trial.study.pruner).__name__
            if mlflow.active_run():
                mlflow.set_tags({"optuna.state": "PRUNED", "optuna.pruned_at_epoch": epoch})
            raise Pruned(f"pruned by {pruner} after epoch {epoch}: {OBJECTIVE} {value:.4f}")


def enqueue_composed(
    study: optuna.Study, space: dict[str, BaseDistribution], config: DictConfig
) -> bool:
    """Queue the composed config's own values as the first trial, when the space holds them:
    the search starts from the recipe the pipeline has, and is measured against it."""
    values = {key: OmegaConf.select(config, key) for key in space}

    def holds(d: BaseDistribution, v: object) -> bool:
        if isinstance(d, CategoricalDistribution):
            return v in d.choices
        return isinstance(v, int | float) and d.low <= v <= d.high

    if not all(holds(space[key], value) for key, value in values.items()):
        return False
    study.enqueue_trial(values, user_attrs={"composed": True})
    return True


def settle_interrupted(study: optuna.Study, space: dict[str, BaseDistribution]) -> int:
    """Trials a killed search left RUNNING will never report: fail them and queue their values
    again (those that had all of them), so the search continues where it stopped. Returns how
    many there were."""
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in stale:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        if set(trial.params) == set(space):
            study.enqueue_trial(trial.params)
    return len(stale)


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=states)


def adopt_command(best: optuna.trial.FrozenTrial) -> str:
    """The command that makes `best` the pipeline's config, as a versioned DVC experiment."""
    return "dvc exp run " + " ".join(f"-S '{key}={value}'" for key, value in best.params.items())


def summary(study: optuna.Study) -> str:
    """Markdown: one row per finished trial, best first, with its state and epochs."""
    lines = ["| trial | state | epochs | val/acc | params |", "|---:|---|---:|---:|---|"]
    rows = sorted(finished(study), key=lambda t: -(t.value if t.value is not None else -1))
    for t in rows:
        value = t.value if t.value is not None else max(t.intermediate_values.values(), default=0)
        params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in t.params.items())  # fmt: skip
        lines.append(
            f"| {t.number} | {t.state.name} | {len(t.intermediate_values)} | {value:.4f} | "
            f"{params} |"
        )
    return "\n".join(lines)


def plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optuna's plots as PNG files, which any browser shows offline: the optimisation history,
    each trial's curve, parameter importances and parallel coordinates. A plot that needs more
    trials than there are is left out."""
    from optuna.visualization import matplotlib as plot

    matplotlib.use("Agg")
    drawn = []
    kinds = {
        "optimization_history": plot.plot_optimization_history,
        "intermediate_values": plot.plot_intermediate_values,
        "param_importances": plot.plot_param_importances,
        "parallel_coordinate": plot.plot_parallel_coordinate,
    }
    for name, draw in kinds.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                axes = draw(study)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.set_size_inches(9, 6)
        figure.tight_layout()
        figure.savefig(folder / f"{name}.png", dpi=100)
        matplotlib.pyplot.close(figure)
        drawn.append(folder / f"{name}.png")
    return drawn


def report(study: optuna.Study, parent_run_id: str | None) -> str:
    """The search's result on the terminal and in its MLflow parent run: the best trial, the
    summary table, Optuna's plots, and the command that adopts the best trial."""
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in finished(study))
    head = f"study {study.study_name}: {len(finished(study))} trials, {pruned} pruned"
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return f"{head}; none completed: widen the space or relax the pruner"
    best = study.best_trial
    adopt = adopt_command(best)
    composed = [t for t in complete if t.user_attrs.get("composed")]
    versus = f" (the composed config, trial {composed[0].number}: {composed[0].value:.4f})"
    text = (
        f"{head}; best trial {best.number}, {OBJECTIVE} {best.value:.4f}"
        f"{versus if composed else ''}\n\n{summary(study)}\n\n"
        f"Make it the pipeline's config (a versioned DVC experiment):\n\n    {adopt}\n"
    )
    if parent_run_id:
        client = mlflow.MlflowClient()
        with mlflow_store.store_errors():
            client.log_text(parent_run_id, text, "search_summary.md")
            client.log_dict(parent_run_id, best.params, "best_params.json")
            client.set_tag(parent_run_id, "search.best_trial", str(best.number))
            client.set_tag(parent_run_id, "search.adopt", adopt)
            client.log_metric(parent_run_id, "search/pruned_trials", pruned)
            with tempfile.TemporaryDirectory() as tmp:
                for path in plots(study, Path(tmp)):
                    client.log_artifact(parent_run_id, str(path), "optuna")
    return text


def parent_params(sweeper: DictConfig) -> dict[str, str]:
    """What defines the search, for its parent run: space, sampler, pruner, size, study."""

    def node(cfg: DictConfig) -> str:
        args = ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "_target_")
        return f"{cfg._target_.rsplit('.', 1)[-1]}({args})"

    params = {f"search.space.{key}": value for key, value in sweeper.params.items()}
    params |= {"search.sampler": node(sweeper.sampler), "search.pruner": node(sweeper.pruner)}
    params |= {"search.n_trials": sweeper.n_trials, "search.n_jobs": sweeper.n_jobs}
    params |= {"search.study": sweeper.study_name}
    return {k: str(v) for k, v in params.items()}


def remembered_parent(study: optuna.Study) -> str | None:
    return study.user_attrs.get(PARENT_ATTR)


def resolve_sweeper(config: DictConfig) -> DictConfig:
    return OmegaConf.create(OmegaConf.to_container(config.hydra.sweeper, resolve=True))

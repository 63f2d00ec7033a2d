"""A Hydra sweeper on current Optuna: TPE (or any sampler), pruning, a study in a database that
a rerun of the same command continues, trials launched by any Hydra launcher (joblib, SLURM).

Hydra finds it in the installed package's hydra_plugins namespace and registers its config as
`hydra/sweeper: cnnpipe_optuna`; conf/hparams_search/*.yaml select it. The work is done in
cnnpipe.experiments.search; this is the loop: ask the study, launch the trials, tell the study.
"""

import os
import sys
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.cnnpipe_optuna.optuna_sweeper.OptunaSweeper"
    # Chosen as hydra/sweeper/sampler=tpe|random and hydra/sweeper/pruner=median|hyperband|none.
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}])
    sampler: Any = MISSING
    pruner: Any = MISSING
    # Trials to finish (complete or pruned); a rerun continues the study up to this many.
    n_trials: int = 16
    # Trials launched at once: the launcher runs them in parallel (joblib's n_jobs, SLURM jobs).
    n_jobs: int = 1
    study_name: str = "cnnpipe"
    # null: sqlite optuna.db beside mlflow.db; or an SQLAlchemy URL; or a Hydra node.
    storage: Any = None
    # Key -> Hydra sweep syntax: interval(...), tag(log, interval(...)), choice(...), range(...).
    params: dict[str, str] = field(default_factory=dict)


SAMPLERS = {
    "tpe": {"_target_": "optuna.samplers.TPESampler", "multivariate": True, "seed": 0},
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": 0},
}
PRUNERS = {
    # Stops a trial below the median of earlier trials at the same epoch: from epoch 2 on, once
    # 4 trials have finished.
    "median": {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 4,
               "n_warmup_steps": 2},
    "hyperband": {"_target_": "optuna.pruners.HyperbandPruner", "min_resource": 1,
                  "reduction_factor": 3},
    "none": {"_target_": "optuna.pruners.NopPruner"},
}  # fmt: skip

store = ConfigStore.instance()
store.store(
    group="hydra/sweeper", name="cnnpipe_optuna", node=OptunaSweeperConf, provider="cnnpipe"
)
for name, node in SAMPLERS.items():
    store.store(group="hydra/sweeper/sampler", name=name, node=node, provider="cnnpipe")
for name, node in PRUNERS.items():
    store.store(group="hydra/sweeper/pruner", name=name, node=node, provider="cnnpipe")


class OptunaSweeper(Sweeper):
    def __init__(self, **_: Any) -> None:
        # Hydra passes the settings above; sweep() reads them resolved from the composed config.
        pass

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        from cnnpipe import PipelineError
        from cnnpipe.experiments import search

        sweeper = search.resolve_sweeper(self.config)
        try:
            with search.study_errors(sweeper, self.config.mlflow.tracking_uri):
                self.search(sweeper, arguments)
        except PipelineError as error:
            # Past Hydra's own reporting, which would add a line on HYDRA_FULL_ERROR.
            sys.exit(f"cnnpipe train: error: {error}")

    def search(self, sweeper: DictConfig, arguments: list[str]) -> None:
        import optuna

        from cnnpipe.experiments import search
        from cnnpipe.experiments.sweep import PARENT_ENV

        space, fixed = search.search_space(dict(sweeper.params), arguments)
        study = search.open_study(sweeper, self.config.mlflow.tracking_uri)
        if parent := os.environ.get(PARENT_ENV):
            study.set_user_attr(search.PARENT_ATTR, parent)
        if not study.trials and search.enqueue_composed(study, space, self.config):
            print(f"study {study.study_name}: trial 0 is the composed config")
        if stale := search.settle_interrupted(study, space):
            print(f"study {study.study_name}: {stale} interrupted trials queued again")
        done = len(search.finished(study))
        if done:
            print(f"study {study.study_name}: {done} of {sweeper.n_trials} trials done, continuing")
        while (done := len(search.finished(study))) < sweeper.n_trials:
            trials = [study.ask(space) for _ in range(min(sweeper.n_jobs, sweeper.n_trials - done))]
            # Job number = trial number: each job finds its trial by it, to report to it.
            numbers = [t.number for t in trials]
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
            batch = [
                [*fixed, *(f"{key}={value}" for key, value in t.params.items())] for t in trials
            ]
            returns = self.launcher.launch(batch, initial_job_idx=numbers[0])
            for trial, ret in zip(trials, returns, strict=True):
                result = ret._return_value
                if isinstance(result, dict) and search.OBJECTIVE in result:
                    study.tell(trial, result[search.OBJECTIVE])
                elif isinstance(result, search.Pruned):
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                else:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    # The search stops as a grid sweep does, with the job's one-line error.
                    print(f"Error executing job with overrides: {ret.overrides}", file=sys.stderr)
                    raise result
        print(search.report(study, search.remembered_parent(study)))

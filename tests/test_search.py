"""Hyperparameter search through Hydra multirun with cnnpipe's Optuna sweeper, for real on tiny
data: TPE with a pruner that must prune, a search killed and continued, two joblib workers on
one sqlite study, the SLURM launcher's config."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from sqlalchemy.exc import SQLAlchemyError

from cnnpipe.experiments.search import distribution, search_space
from tests.helpers import ROOT, SEARCH, cnnpipe

BIN = Path(sys.executable).parent


def search(repo: Path, *args: str, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    return cnnpipe("train", "--multirun", *SEARCH, *args, check=True, **kwargs)


def study(repo: Path) -> optuna.Study:
    return optuna.load_study(study_name="test", storage=f"sqlite:///{repo / 'optuna.db'}")


def completed(repo: Path) -> int:
    """Completed trials so far; 0 while the search is still creating its study."""
    try:
        return len(study(repo).get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    except (KeyError, SQLAlchemyError):
        # Not there yet, or its tables are being created by the search at this moment.
        return 0


def runs(repo: Path) -> tuple[mlflow.entities.Run, dict[int, mlflow.entities.Run]]:
    """The search's parent run and its children by trial number (each trial has one)."""
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("cnnpipe").experiment_id])
    (parent,) = [r for r in found if "sweep.dir" in r.data.tags]
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(found) == 1 + len(children), "every run belongs to the search"
    by_trial = {int(c.data.tags["optuna.trial"]): c for c in children}
    assert len(by_trial) == len(children), "one run per trial"
    return parent, by_trial


def test_search_space_in_hydra_syntax():
    parse = OverridesParser.create().parse_override
    assert distribution(parse("a=tag(log, interval(1e-4, 1e-2))")) == FloatDistribution(
        1e-4, 1e-2, log=True
    )
    assert distribution(parse("a=interval(0, 0.5)")) == FloatDistribution(0, 0.5)
    assert distribution(parse("a=choice(64, 128)")) == CategoricalDistribution([64, 128])
    assert distribution(parse("a=range(1, 7, 2)")) == IntDistribution(1, 5, step=2)
    space, fixed = search_space(
        {"optim.lr": "interval(1e-3, 1e-2)", "seed": "choice(0, 1)"},
        ["seed=3", "loader.batch_size=choice(32, 64)", "hparams_search=chapter_cnn"],
    )
    assert space == {
        "optim.lr": FloatDistribution(1e-3, 1e-2),
        "loader.batch_size": CategoricalDistribution([32, 64]),
    }
    assert fixed == ["seed=3", "hparams_search=chapter_cnn"], "a plain value leaves the search"


def test_search_composes_with_the_slurm_launcher():
    overrides = ["hparams_search=chapter_cnn", "hydra/launcher=slurm", "trainer=gpu"]
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides, return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("cnnpipe_optuna.optuna_sweeper.OptunaSweeper")
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert cfg.hydra.sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert cfg.hydra.sweeper.sampler.multivariate is True
    assert cfg.hydra.sweeper.params["optim.lr"] == "tag(log, interval(1e-3, 2e-2))"
    assert cfg.trainer.max_epochs == 8 and cfg.trainer.accelerator == "gpu"


@pytest.mark.slow
def test_tpe_search_prunes_and_each_trial_is_one_mlflow_run(project):
    repo, tiny = project
    out = search(
        repo, *tiny, "hydra.sweeper.n_trials=6",
        "hydra.sweeper.pruner._target_=tests.helpers.PruneOddTrials",
    ).stdout  # fmt: skip

    trials = {t.number: t for t in study(repo).trials}
    assert sorted(trials) == list(range(6))
    composed = {"optim.lr": 0.005, "optim.weight_decay": 0.05, "optim.label_smoothing": 0.1}
    assert trials[0].params == composed, "the search starts from the recipe as composed"
    assert f"(the composed config, trial 0: {trials[0].value:.4f})" in out
    pruned = [n for n, t in trials.items() if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned == [1, 3, 5]
    parent, children = runs(repo)
    assert sorted(children) == sorted(trials)
    for number, trial in trials.items():
        child = children[number]
        history = [m.step for m in mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
                   .get_metric_history(child.info.run_id, "val/acc")]  # fmt: skip
        assert list(trial.intermediate_values) == history, "one report per logged epoch"
        assert child.data.params["optim.lr"] == str(trial.params["optim.lr"])
        assert "test.acc" not in child.data.metrics, "a search never looks at the test set"
        if number in pruned:
            assert (child.info.status, child.data.tags["optuna.state"]) == ("KILLED", "PRUNED")
            assert history == [1], "stopped after its first epoch"
        else:
            assert (child.info.status, child.data.tags["optuna.state"]) == ("FINISHED", "COMPLETE")
            assert child.data.metrics["val/acc"] == trial.value
            assert history == [1, 2]
    best = study(repo).best_trial
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["search.best_trial"] == str(best.number)
    assert parent.data.tags["sweep.best_run"] == children[best.number].info.run_id
    assert parent.data.params["search.sampler"] == "TPESampler(multivariate=True, seed=0)"
    assert parent.data.params["search.space.optim.weight_decay"] == (
        "tag(log, interval(1e-3, 0.3))"
    )
    assert parent.data.metrics["search/pruned_trials"] == 3
    artifacts = {a.path for a in mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
                 .list_artifacts(parent.info.run_id, "optuna")}  # fmt: skip
    assert {"optuna/optimization_history.png", "optuna/intermediate_values.png"} <= artifacts
    adopt = " ".join(f"-S '{k}={v}'" for k, v in best.params.items())
    assert f"dvc exp run {adopt}" in out


@pytest.mark.slow
def test_a_killed_search_continues_to_n_trials_without_repeating_a_trial(project):
    repo, tiny = project
    args = [*tiny, "hydra.sweeper.n_trials=4"]
    first = search(repo, *args, background=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        # Read the study only once a job has started: the search has made its tables by then.
        while not list(repo.glob("sweeps/*/0")) or completed(repo) < 2:
            assert first.poll() is None and time.monotonic() < deadline, "two trials, in time"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    before = {t.number: t.params for t in study(repo).trials if t.state.is_finished()}

    search(repo, *args)

    trials = study(repo).trials
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4
    assert len({tuple(sorted(t.params.items())) for t in done}) == 4, "no trial twice"
    for number, params in before.items():
        assert trials[number].params == params, "finished trials were kept as they were"
    killed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(killed) <= 1
    parent, children = runs(repo)
    assert parent.info.status == "FINISHED", "the same parent run, continued and closed"
    for t in done:
        assert children[t.number].info.status == "FINISHED"
    for t in killed:
        # Its run, if it had started one, reads KILLED (the kill may come before that).
        assert t.number not in children or children[t.number].info.status == "KILLED"
        # Queued again with the same values, and finished this time (unless the kill came
        # before the sampler had drawn them all).
        assert len(t.params) < 3 or t.params in [d.params for d in done]


@pytest.mark.slow
def test_two_joblib_workers_share_one_study_and_lose_nothing(project):
    repo, tiny = project
    started = repo / "started"
    # Each training waits at its start for another one: the two workers must overlap.
    search(
        repo, *tiny, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=4",
        "+callbacks.rendezvous._target_=tests.helpers.Rendezvous",
        f"+callbacks.rendezvous.folder={started}",
    )  # fmt: skip
    trials = study(repo).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert len(list(started.iterdir())) >= 2, "trainings in two processes at once"
    parent, children = runs(repo)
    assert sorted(children) == [0, 1, 2, 3]
    first, second = children[0].info, children[1].info
    assert second.start_time < first.end_time, "trials 0 and 1 ran at the same time"
    for t in trials:
        assert children[t.number].data.metrics["val/acc"] == t.value
        assert children[t.number].data.params["optim.lr"] == str(t.params["optim.lr"])


@pytest.mark.slow
def test_a_locked_or_read_only_study_fails_the_search_in_one_line(project):
    repo, _ = project
    db = repo / "optuna.db"
    optuna.create_study(study_name="test", storage=f"sqlite:///{db}")
    holder = sqlite3.connect(db)
    holder.execute("BEGIN EXCLUSIVE")  # another process in the middle of a write
    try:
        locked = cnnpipe("train", "--multirun", *SEARCH, timeout=300)
    finally:
        holder.rollback()
        holder.close()
    read_only = f"sqlite:///file:{db}?mode=ro&uri=true"
    refused = cnnpipe(
        "train", "--multirun", *SEARCH, f"hydra.sweeper.storage='{read_only}'", timeout=300
    )
    for result, uri, says in (
        (locked, f"sqlite:///{db}", "the sqlite database is locked by another process"),
        (refused, read_only, "the store is read-only; make it writable or point "
                             "hydra.sweeper.storage elsewhere"),
    ):  # fmt: skip
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            line for line in result.stderr.splitlines() if line.startswith("cnnpipe train: error")
        ], result.stderr
        assert result.stderr.startswith(f"cnnpipe train: error: Optuna storage {uri}: {says}")

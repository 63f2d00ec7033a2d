"""A training run: the recipe fitted with Lightning, its per-epoch history, its MLflow dataset,
and a resume from the last finished epoch when the same recipe was interrupted. The train and
baseline stages and the sweeps' jobs all train through `train()`."""

import csv
import hashlib
import json
import resource
import shutil
import time
from pathlib import Path

import mlflow
import pytorch_lightning as pl
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, Timer
from pytorch_lightning.utilities import rank_zero_only
from sqlalchemy.exc import SQLAlchemyError

from cnnpipe import PipelineError
from cnnpipe.base.files import atomic_path
from cnnpipe.base.sources import source_files
from cnnpipe.data.loader import ImageDataModule
from cnnpipe.tracking.datasets import dataset_tags, mlflow_dataset
from cnnpipe.tracking.stage_run import record
from cnnpipe.training import build

HISTORY_KEYS = ["train/loss", "train/acc", "val/loss", "val/acc"]
# Every setting that changes what is trained: what a resume must share, and the train stage's
# `params` in dvc.yaml (a test holds them equal).
RECIPE_KEYS = ["seed", "data", "model", "optim", "loader", "trainer"]


class EpochHistory(pl.Callback):
    """One row of epoch-level metrics per epoch, with the training time so far, for `dvc plots`;
    with `run_id`, the same values go to that MLflow run with step = epoch (1..N)."""

    def __init__(self, timer: Timer, run_id: str | None = None) -> None:
        self.timer, self.run_id, self.rows = timer, run_id, []

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # A resumed run already has the epochs the killed one logged: log each epoch once.
        self.logged = set()
        if self.run_id:
            history = mlflow.MlflowClient().get_metric_history(self.run_id, "val/acc")
            self.logged = {m.step for m in history}

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        epoch = trainer.current_epoch + 1
        values = {key: round(float(metrics[key]), 6) for key in HISTORY_KEYS if key in metrics}
        seconds = round(self.timer.time_elapsed("train"), 2)
        self.rows.append({"epoch": epoch, **values, "seconds": seconds})
        if self.run_id and epoch not in self.logged:
            now = int(time.time() * 1000)
            batch = [Metric(key, value, now, epoch) for key, value in values.items()]
            mlflow.MlflowClient().log_batch(self.run_id, metrics=batch, synchronous=True)

    # Saved in checkpoints, so a resumed run's history starts at epoch 1, not where it resumed.
    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = state["rows"]


def fingerprint(cfg: DictConfig) -> str:
    """What a run must share with an interrupted one to resume it: data, network, recipe and
    the code that trains (a checkpoint left by older code is not resumed by newer code): the
    keys and files the train stage depends on in dvc.yaml."""
    recipe = OmegaConf.to_container(OmegaConf.masked_copy(cfg, RECIPE_KEYS), resolve=True)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for source in source_files(__name__):
        digest.update(source.read_bytes())
    return digest.hexdigest()


def resume_checkpoint(cfg: DictConfig) -> Path:
    return Path(cfg.paths.resume) / "checkpoint" / "last.ckpt"


def interrupted_run(cfg: DictConfig) -> dict | None:
    """The state an interrupted run of this same recipe left in `paths.resume`, or None."""
    try:
        state = json.loads((Path(cfg.paths.resume) / "state.json").read_text())
    except (OSError, ValueError):
        return None
    same_recipe = state.get("fingerprint") == fingerprint(cfg)
    return state if same_recipe and resume_checkpoint(cfg).is_file() else None


def train(
    cfg: DictConfig, run_id: str | None = None, callbacks: tuple[pl.Callback, ...] = ()
) -> dict:
    """Fit the model described by `cfg`, with `callbacks` besides the stage's own; write checkpoint
    and history to `cfg.paths`; return the metrics.

    Every epoch saves a full checkpoint to `paths.resume`; a run of the same recipe that finds
    one (the previous run was killed) continues from it. The folder is removed on success.
    """
    pl.seed_everything(cfg.seed, workers=True)
    used = build.announce_precision(cfg)
    resume = start_or_resume(cfg, run_id)
    data = build.datamodule(cfg)
    data.setup("fit")
    if run_id:
        log_dataset(data)
        # trainer.precision may be "auto": the run says what this machine trained in.
        mlflow.log_param("trainer.precision_used", used)
    module = build.module(cfg, data)
    timer = Timer()
    history = EpochHistory(timer, run_id)
    # With no metric to monitor, the one checkpoint kept is the newest.
    checkpoint = resume_checkpoint(cfg)
    last = ModelCheckpoint(
        checkpoint.parent,
        checkpoint.stem,
        enable_version_counter=False,
        save_on_train_epoch_end=True,
    )
    trainer = build.trainer(
        cfg,
        [history, timer, last, *callbacks],
        enable_checkpointing=True,
        # Where Lightning saves on SLURM's requeue signal (hpc_ckpt_*.ckpt): inside the resume
        # state, which a finished run removes; the resume itself starts from `last`.
        default_root_dir=Path(cfg.paths.resume),
    )
    try:
        trainer.fit(module, datamodule=data, ckpt_path=checkpoint if resume else None)
    except PipelineError:
        # A diverged run's last checkpoint holds NaNs: nothing there is worth resuming.
        shutil.rmtree(cfg.paths.resume, ignore_errors=True)
        raise
    metrics = fit_metrics(history, timer, data.train_size * trainer.current_epoch)
    save_outputs(cfg, trainer, history)
    return metrics


def start_or_resume(cfg: DictConfig, run_id: str | None) -> dict | None:
    """The state of an interrupted run of this recipe to resume, or None after starting a fresh
    state in `paths.resume`."""
    resume = interrupted_run(cfg)
    if resume:
        print(f"resuming the interrupted run from {resume_checkpoint(cfg)}")
    elif rank_zero_only.rank == 0:  # under DDP every process trains; rank 0 writes the files
        resume_dir = Path(cfg.paths.resume)
        shutil.rmtree(resume_dir, ignore_errors=True)
        resume_dir.mkdir(parents=True)
        state = {"fingerprint": fingerprint(cfg), "run_id": run_id}
        (resume_dir / "state.json").write_text(json.dumps(state) + "\n")
    return resume


def log_dataset(data: ImageDataModule) -> None:
    """The data by content, as the active run's training input: runs on the same data show the
    same digest, wherever it came from."""
    dataset = mlflow_dataset(data.prepared)
    tags = dataset_tags(data.prepared.manifest)
    try:
        mlflow.log_input(dataset, "training", tags)
    except (MlflowException, SQLAlchemyError):
        # Parallel jobs on a new store can both find the dataset missing and both insert it;
        # the second insert fails, and once more it finds the first one's row.
        mlflow.log_input(dataset, "training", tags)


def fit_metrics(history: EpochHistory, timer: Timer, images: int) -> dict:
    """The last epoch's metrics, the time and speed of training over `images`, and the peak
    memory."""
    seconds = timer.time_elapsed("train")
    return {
        **{k: v for k, v in history.rows[-1].items() if k not in ("epoch", "seconds")},
        "train.epochs": history.rows[-1]["epoch"],
        "train.seconds": round(seconds, 2),
        "train.images_per_second": round(images / seconds, 1),
        # ru_maxrss is in KiB on Linux: the peak of this whole process, data included.
        "train.peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def save_outputs(cfg: DictConfig, trainer: pl.Trainer, history: EpochHistory) -> None:
    """The checkpoint and the history to `cfg.paths`, and the resume state removed."""
    if rank_zero_only.rank != 0:
        # Only joins the barrier inside save_checkpoint: rank 0 writes the file.
        trainer.save_checkpoint(cfg.paths.checkpoint, weights_only=True)
        return
    with atomic_path(cfg.paths.checkpoint) as tmp:
        # Weights and hyperparameters only: the optimizer state is not needed to evaluate or export.
        trainer.save_checkpoint(tmp, weights_only=True)
    with atomic_path(cfg.paths.history) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", *HISTORY_KEYS, "seconds"])
        writer.writeheader()
        writer.writerows(history.rows)
    shutil.rmtree(cfg.paths.resume)


def log_training(cfg: DictConfig, metrics: dict) -> None:
    """The training result: `paths.train_metrics` and the active MLflow run, and the history."""
    record(cfg.paths.train_metrics, metrics, curves=tuple(HISTORY_KEYS))
    mlflow.log_artifact(cfg.paths.history, "plots")

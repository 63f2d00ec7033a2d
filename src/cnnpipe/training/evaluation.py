"""Score a checkpoint as deployed on the test set: accuracy, per-class accuracy, loss and the
confusion matrix (CSV for `dvc plots`, PNG for people), and the reference drift is measured
against. The evaluate and baseline stages and the sweeps' jobs score through `evaluate()`."""

import csv
import json

import mlflow
import torch.nn.functional as F
from omegaconf import DictConfig
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cnnpipe.base.config import dataset_name
from cnnpipe.base.files import atomic_path
from cnnpipe.data import drift
from cnnpipe.data.loader import read_split
from cnnpipe.tracking.stage_run import record
from cnnpipe.training.classifier import load_checkpoint
from cnnpipe.training.inference import TorchModel, nhwc, predict_probs


def evaluate(cfg: DictConfig) -> dict:
    """Score the checkpoint on the test set: write the confusion CSV and PNG, return the metrics."""
    module = load_checkpoint(cfg.paths.checkpoint)
    names = module.hparams.class_names
    images, labels = read_split(cfg, "test")
    model = TorchModel(module, **cfg.evaluate.tta)
    probs = predict_probs(model, nhwc(images), cfg.evaluate.batch_size)
    predicted = probs.argmax(1)
    per_class = MulticlassAccuracy(len(names), average=None)(probs, labels)
    confusion = MulticlassConfusionMatrix(len(names))
    confusion.update(probs, labels)
    metrics = {
        "test.acc": round(float((predicted == labels).float().mean()), 6),
        "test.loss": round(float(F.nll_loss(probs.clamp_min(1e-12).log(), labels)), 6),
        **{f"test.acc.{n}": round(float(a), 6) for n, a in zip(names, per_class, strict=True)},
    }
    with atomic_path(cfg.paths.confusion_csv) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true class", "predicted class"])
        writer.writerows([names[a], names[p]] for a, p in zip(labels, predicted, strict=True))
    fig, ax = confusion_figure(confusion, names)
    ax.set_title(f"{dataset_name(cfg.data)} test set: accuracy {metrics['test.acc']:.2%}")
    with atomic_path(cfg.paths.confusion_png) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    reference = drift.reference(nhwc(images).numpy(), probs.numpy())
    with atomic_path(cfg.paths.drift_reference) as tmp:
        tmp.write_text(json.dumps(reference, indent=1))
    return metrics


def confusion_figure(confusion: MulticlassConfusionMatrix, names: list[str]):
    """The confusion matrix drawn to stay readable from 2 classes to 100: counts in the cells
    only while they fit, class names shrinking with their number."""
    n = len(names)
    fig, ax = confusion.plot(labels=names, add_text=n <= 20)
    fig.set_size_inches(*[min(max(8, 0.4 * n + 4), 40)] * 2)
    if n > 20:
        ax.tick_params(labelsize=8)
        ax.tick_params(axis="x", labelrotation=90)
        ax.tick_params(axis="y", labelrotation=0)
    return fig, ax


def log_evaluation(cfg: DictConfig, metrics: dict) -> None:
    """The test result: `paths.eval_metrics` and the active MLflow run, and the confusion plot."""
    record(cfg.paths.eval_metrics, metrics)
    mlflow.log_artifact(cfg.paths.confusion_png, "plots")

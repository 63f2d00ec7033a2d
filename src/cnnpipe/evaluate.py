"""Stage `evaluate`: test-set accuracy, per-class accuracy and the confusion matrix."""

import argparse
import csv
import json
from pathlib import Path

import mlflow
import torch.nn.functional as F
from omegaconf import DictConfig
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cnnpipe import tracking
from cnnpipe.config import load_params
from cnnpipe.data import read_split
from cnnpipe.files import atomic_path
from cnnpipe.module import Predictor, load_checkpoint, predict_probs


def evaluate(cfg: DictConfig) -> dict:
    """Score the checkpoint on the test set; write metrics JSON, confusion CSV and PNG."""
    module = load_checkpoint(cfg.paths.checkpoint)
    names = module.hparams.class_names
    images, labels = read_split(Path(cfg.paths.data), "test")
    predictor = Predictor(module, cfg.evaluate.tta_flip)
    probs = predict_probs(predictor, images, cfg.evaluate.batch_size)
    predicted = probs.argmax(1)
    per_class = MulticlassAccuracy(len(names), average=None)(probs, labels)
    confusion = MulticlassConfusionMatrix(len(names))
    confusion.update(probs, labels)
    metrics = {
        "test/acc": round(float((predicted == labels).float().mean()), 6),
        "test/loss": round(float(F.nll_loss(probs.clamp_min(1e-12).log(), labels)), 6),
        "test/per_class_acc": {
            name: round(float(acc), 6) for name, acc in zip(names, per_class, strict=True)
        },
    }

    with atomic_path(cfg.paths.eval_metrics) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    with atomic_path(cfg.paths.confusion_csv) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows([names[a], names[p]] for a, p in zip(labels, predicted, strict=True))
    fig, ax = confusion.plot(labels=names)
    fig.set_size_inches(8, 8)
    ax.set_title(f"CIFAR-10 test set: accuracy {metrics['test/acc']:.2%}")
    with atomic_path(cfg.paths.confusion_png) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    return metrics


def log_evaluation(cfg: DictConfig, metrics: dict) -> None:
    """Into the active MLflow run: test metrics, per-class accuracy, the metrics file and plot."""
    mlflow.log_metrics({"test/acc": metrics["test/acc"], "test/loss": metrics["test/loss"]})
    mlflow.log_metrics({f"test/acc/{n}": a for n, a in metrics["test/per_class_acc"].items()})
    for path in (cfg.paths.eval_metrics, cfg.paths.confusion_png):
        mlflow.log_artifact(path, "evaluate")


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="cnnpipe evaluate", description=__doc__).parse_args(argv)
    cfg = load_params()
    metrics = evaluate(cfg)
    with tracking.pipeline_run(cfg, Path(cfg.paths.run)):
        log_evaluation(cfg, metrics)
    print(f"test/acc {metrics['test/acc']:.4f}")

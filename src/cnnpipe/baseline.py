"""Stage `baseline`: the dense network on raw pixels, trained and tested with the CNN's recipe."""

import argparse
import json
from pathlib import Path

import mlflow
from omegaconf import DictConfig, OmegaConf

from cnnpipe import tracking
from cnnpipe.config import load_params
from cnnpipe.evaluate import evaluate
from cnnpipe.files import atomic_path
from cnnpipe.module import load_checkpoint
from cnnpipe.train import train

# The outputs train and evaluate write, moved into the baseline's own folder.
OUTPUTS = [
    "checkpoint",
    "history",
    "train_metrics",
    "eval_metrics",
    "confusion_csv",
    "confusion_png",
]


def baseline_config(cfg: DictConfig) -> DictConfig:
    """`cfg` with the baseline network in place of the model and its outputs in paths.baseline."""
    folder = Path(cfg.paths.baseline)
    paths = {key: str(folder / Path(cfg.paths[key]).name) for key in OUTPUTS}
    return OmegaConf.merge(cfg, {"model": cfg.baseline.model, "paths": paths})


def train_baseline(cfg: DictConfig) -> dict:
    """Train and test the baseline; return what the chapter report compares with the CNN."""
    bcfg = baseline_config(cfg)
    trained = train(bcfg)
    tested = evaluate(bcfg)
    module = load_checkpoint(bcfg.paths.checkpoint)
    return {
        "params": sum(p.numel() for p in module.net.parameters()),
        "val/acc": trained["val/acc"],
        "test/acc": tested["test/acc"],
        "train_seconds": trained["train_seconds"],
    }


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="cnnpipe baseline", description=__doc__).parse_args(argv)
    cfg = load_params()
    metrics = train_baseline(cfg)
    with atomic_path(cfg.paths.baseline_metrics) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    with tracking.pipeline_run(cfg, Path(cfg.paths.run)):
        mlflow.log_metrics({f"baseline/{k}": v for k, v in metrics.items()})
    print(f"dense baseline: {metrics['params']:,} parameters, test/acc {metrics['test/acc']:.4f}")

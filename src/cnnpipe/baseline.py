"""Stage `baseline`: the dense network on raw pixels, trained and tested with the CNN's recipe."""

import argparse

from omegaconf import DictConfig, OmegaConf

from cnnpipe import tracking
from cnnpipe.config import load_params, outputs_under
from cnnpipe.evaluate import evaluate
from cnnpipe.module import load_checkpoint
from cnnpipe.train import train


def baseline_config(cfg: DictConfig) -> DictConfig:
    """`cfg` with the baseline network in place of the model and its outputs in paths.baseline."""
    return outputs_under(OmegaConf.merge(cfg, {"model": cfg.baseline.model}), cfg.paths.baseline)


def train_baseline(cfg: DictConfig) -> dict:
    """Train and test the baseline; return what the chapter report compares with the CNN."""
    bcfg = baseline_config(cfg)
    trained = train(bcfg)
    tested = evaluate(bcfg)
    module = load_checkpoint(bcfg.paths.checkpoint)
    return {
        "baseline/params": sum(p.numel() for p in module.net.parameters()),
        "baseline/val_acc": trained["val/acc"],
        "baseline/test_acc": tested["test/acc"],
        "baseline/train_seconds": trained["train/seconds"],
    }


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="cnnpipe baseline", description=__doc__).parse_args(argv)
    cfg = load_params()
    with tracking.stage_run(cfg, "baseline"):
        metrics = train_baseline(cfg)
        tracking.record(cfg.paths.baseline_metrics, metrics)
    print(
        f"dense baseline: {metrics['baseline/params']:,} parameters, "
        f"test/acc {metrics['baseline/test_acc']:.4f}"
    )

"""Stage `baseline`: the dense network on raw pixels, trained and tested with the CNN's recipe."""

from omegaconf import DictConfig

from cnnpipe.base.args import Parser
from cnnpipe.base.config import baseline_config, load_params


def train_baseline(cfg: DictConfig) -> dict:
    """Train and test the baseline; return what the chapter report compares with the CNN."""
    from cnnpipe.training.classifier import load_checkpoint
    from cnnpipe.training.evaluation import evaluate
    from cnnpipe.training.fit import train

    bcfg = baseline_config(cfg)
    trained = train(bcfg)
    tested = evaluate(bcfg)
    module = load_checkpoint(bcfg.paths.checkpoint)
    return {
        "baseline.params": sum(p.numel() for p in module.net.parameters()),
        "baseline.val_acc": trained["val/acc"],
        "baseline.test_acc": tested["test.acc"],
        "baseline.train_seconds": trained["train.seconds"],
    }


def main(argv: list[str] | None = None) -> None:
    Parser(prog="cnnpipe baseline", description=__doc__).parse_args(argv)
    cfg = load_params()
    from cnnpipe.tracking.stage_run import record, stage_run

    with stage_run(cfg, "baseline"):
        metrics = train_baseline(cfg)
        record(cfg.paths.baseline_metrics, metrics)
    print(
        f"dense baseline: {metrics['baseline.params']:,} parameters, "
        f"test.acc {metrics['baseline.test_acc']:.4f}"
    )

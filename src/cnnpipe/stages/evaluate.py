"""Stage `evaluate`: test-set accuracy, per-class accuracy and the confusion matrix."""

from cnnpipe.base.args import Parser
from cnnpipe.base.config import load_params


def main(argv: list[str] | None = None) -> None:
    Parser(prog="cnnpipe evaluate", description=__doc__).parse_args(argv)
    cfg = load_params()
    from cnnpipe.tracking.stage_run import stage_run
    from cnnpipe.training.evaluation import evaluate, log_evaluation

    with stage_run(cfg, "evaluate"):
        metrics = evaluate(cfg)
        log_evaluation(cfg, metrics)
    print(f"test.acc {metrics['test.acc']:.4f}")

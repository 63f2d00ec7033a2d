"""Stage `evaluate`: test-set accuracy, per-class accuracy and the confusion matrix."""

from cnnpipe.args import Parser
from cnnpipe.config import load_params
from cnnpipe.evaluation import evaluate, log_evaluation
from cnnpipe.tracking.stage_run import stage_run


def main(argv: list[str] | None = None) -> None:
    Parser(prog="cnnpipe evaluate", description=__doc__).parse_args(argv)
    cfg = load_params()
    with stage_run(cfg, "evaluate"):
        metrics = evaluate(cfg)
        log_evaluation(cfg, metrics)
    print(f"test.acc {metrics['test.acc']:.4f}")

"""Stage `chapter`: the textbook chapter's claims about CNNs, each shown by a number or picture
(cnnpipe.chapter)."""

from pathlib import Path

from cnnpipe.base.args import Parser
from cnnpipe.base.config import baseline_config, load_params
from cnnpipe.base.files import atomic_path


def main(argv: list[str] | None = None) -> None:
    Parser(prog="cnnpipe chapter", description=__doc__).parse_args(argv)
    cfg = load_params()
    import mlflow

    from cnnpipe.chapter.measures import measure
    from cnnpipe.chapter.plots import draw
    from cnnpipe.chapter.report import report, self_contained_html
    from cnnpipe.data.loader import read_split
    from cnnpipe.tracking.stage_run import record, stage_run
    from cnnpipe.training.classifier import load_checkpoint

    with stage_run(cfg, "chapter"):
        module = load_checkpoint(cfg.paths.checkpoint)
        baseline = load_checkpoint(baseline_config(cfg).paths.checkpoint)
        images, labels = read_split(cfg, "test")
        numbers = measure(cfg, module, baseline, images)
        numbers["chapter.mistakes_shown"] = draw(cfg, module, images, labels)
        record(cfg.paths.chapter_metrics, numbers)
        markdown = report(cfg, numbers)
        with atomic_path(cfg.paths.chapter_report) as tmp:
            tmp.write_text(markdown)
        here = Path(cfg.paths.chapter_report).parent
        mlflow.log_text(self_contained_html(markdown, here), "reports/chapter.html")
    print(f"wrote {cfg.paths.chapter_report}")

"""`cnnpipe share --to URI`: copy this store's runs, with their metrics, artifacts, datasets and
logged models, and its registered versions with their aliases, to a team's server.

MLflow cannot set a run's id, and the old id lives in outputs DVC tracks (models/mlflow_run.json,
the ONNX file's metadata): rewriting them would retrain. So each copy carries the id it came
from (the tag cnnpipe.copied_from), and a stage that finds its recorded run missing uses the copy
(tracking/stage_run.py). Copying again copies only what is new."""

import os

from cnnpipe import PipelineError
from cnnpipe.base.args import Parser


def arguments() -> Parser:
    parser = Parser(prog="cnnpipe share", description=__doc__)
    parser.add_argument("--to", required=True, metavar="URI", help="the team's MLflow server")
    parser.add_argument(
        "--from", dest="source", metavar="URI",
        help="the store to copy (default: MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)
    from cnnpipe.tracking.copying import Copier
    from cnnpipe.tracking.store import quiet_mlflow, store_errors, tracking_uri

    quiet_mlflow()
    source = args.source or tracking_uri()
    if source.rstrip("/") == args.to.rstrip("/"):
        raise PipelineError(f"{source} is the store to copy from and to; give --from or --to")
    # A progress bar for each file downloaded says nothing.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with store_errors():
        copier = Copier(source, args.to)
        copied = copier.everything()
    for line in copier.kept:
        print(f"{line}; to move it by hand see docs/pipeline.md, The gate before @champion")
    print(
        f"shared {copied['runs']} runs, {copied['models']} logged models and "
        f"{copied['versions']} registered versions from {source} to {args.to} "
        f"({copied['kept']} runs were there already)"
    )

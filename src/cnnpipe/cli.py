"""`cnnpipe <command>`: one command per pipeline stage, plus `params`, `predict`, `serve`,
`review`, `monitor`, `runs` and `share`."""

import errno
import importlib
import os
import sys
from pathlib import Path

from cnnpipe import PipelineError
from cnnpipe.base import files

# Modules are imported on demand so that `cnnpipe prepare` does not pay for torch, MLflow and ONNX.
COMMANDS = {
    "params": "cnnpipe.base.config",
    # The stages of dvc.yaml, in its order.
    "prepare": "cnnpipe.stages.prepare",
    "train": "cnnpipe.stages.train",
    "evaluate": "cnnpipe.stages.evaluate",
    "params-report": "cnnpipe.stages.params_report",
    "export": "cnnpipe.stages.export",
    "parity": "cnnpipe.stages.parity",
    "promote": "cnnpipe.stages.promote",
    "quantize": "cnnpipe.stages.quantize",
    "baseline": "cnnpipe.stages.baseline",
    "chapter": "cnnpipe.stages.chapter",
    # Using the model, and the runs.
    "predict": "cnnpipe.serving.predict",
    "serve": "cnnpipe.serving.server",
    "review": "cnnpipe.serving.review",
    "monitor": "cnnpipe.serving.monitor",
    "runs": "cnnpipe.experiments.runs",
    "share": "cnnpipe.experiments.share",
}


def experiment_hint() -> str:
    """Under `dvc exp run -S ...` in the workspace, DVC has written the experiment's values into
    params.yaml, where they stay after a failure: the next `dvc repro` would fail the same way."""
    root = os.environ.get("DVC_ROOT")
    if (
        not os.environ.get("DVC_EXP_NAME")
        or not root
        or Path(root).resolve() != Path.cwd().resolve()
    ):
        return ""
    return (
        " (params.yaml keeps this experiment's values: `git checkout params.yaml` restores the "
        "committed ones)"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        sys.exit(f"usage: cnnpipe {{{','.join(COMMANDS)}}} [--help]")
    command, rest = argv[0], argv[1:]
    module = COMMANDS[command]
    if command == "train" and rest and rest[0] not in ("-h", "--help"):
        # With overrides, training is a Hydra job outside DVC, into sweeps/.
        module = "cnnpipe.experiments.sweep"
    try:
        importlib.import_module(module).main(rest)
    except PipelineError as error:
        sys.exit(f"cnnpipe {command}: error: {error}{experiment_hint()}")
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        # Outputs are written under temporary names: nothing half-written is left behind. The
        # output named, not the temporary file a library may have written first (/tmp/tmp...).
        where = files.writing or error.filename
        folder = f"the disk that holds {where.parent}/" if files.writing else "the disk"
        sys.exit(
            f"cnnpipe {command}: error: cannot write {where or 'a file'} ({error.strerror}): "
            f"{folder} is full; free some space there, then run again"
        )


if __name__ == "__main__":
    main()

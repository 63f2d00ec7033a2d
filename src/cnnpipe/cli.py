"""`cnnpipe <command>`: one command per pipeline stage, plus `params`, `predict`, `serve` and
`runs`."""

import errno
import importlib
import sys

from cnnpipe import PipelineError

# Modules are imported on demand so that `cnnpipe fetch` does not pay for torch, MLflow and ONNX.
COMMANDS = {
    "params": "cnnpipe.config",
    "fetch": "cnnpipe.fetch",
    "train": "cnnpipe.train",
    "evaluate": "cnnpipe.evaluate",
    "params-report": "cnnpipe.params_report",
    "export": "cnnpipe.export",
    "parity": "cnnpipe.parity",
    "baseline": "cnnpipe.baseline",
    "chapter": "cnnpipe.chapter",
    "quantize": "cnnpipe.quantize",
    "predict": "cnnpipe.predict",
    "serve": "cnnpipe.serve",
    "runs": "cnnpipe.runs",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        sys.exit(f"usage: cnnpipe {{{','.join(COMMANDS)}}} [--help]")
    command, rest = argv[0], argv[1:]
    module = COMMANDS[command]
    if command == "train" and rest and rest[0] not in ("-h", "--help"):
        # With overrides, training is a Hydra job outside DVC (cnnpipe.sweep imports cnnpipe.train).
        module = "cnnpipe.sweep"
    try:
        importlib.import_module(module).main(rest)
    except PipelineError as error:
        sys.exit(f"cnnpipe {command}: error: {error}")
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        # Outputs are written under temporary names: nothing half-written is left behind.
        sys.exit(
            f"cnnpipe {command}: error: cannot write {error.filename or 'a file'} "
            f"({error.strerror}); free some disk space, then run again"
        )


if __name__ == "__main__":
    main()

"""cnnpipe: the textbook CIFAR-10 CNN as a reproducible DVC + Lightning + MLflow + ONNX pipeline."""


class PipelineError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""

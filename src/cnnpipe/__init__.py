"""cnnpipe: the textbook CIFAR-10 CNN as a reproducible DVC + Lightning + MLflow + ONNX pipeline.

Packages by the road the data travels, each importing only those before it (tests/test_layout.py):
base (files, processes, config) < data (images in) < tracking (MLflow) < training (a network
trained and scored) < artifact (the deployable file); serving, experiments, chapter and stages
use them, and cli.py sits on top.
"""


class PipelineError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""

"""The package's layout is its architecture: imports run one way, stages stand alone, serving
runs without the training stack, and the ONNX interface has one home."""

import pkgutil
import re
import subprocess
import sys

import cnnpipe
from cnnpipe.sources import imported
from tests.helpers import ROOT

MODULES = [m.name for m in pkgutil.walk_packages(cnnpipe.__path__, "cnnpipe.")]


def test_no_import_circles():
    graph = {m: {i for i in imported(m) if i in MODULES and i != m} for m in MODULES}
    done, path = set(), []

    def visit(module: str) -> None:
        assert module not in path, f"import circle: {' -> '.join([*path, module])}"
        if module in done:
            return
        path.append(module)
        for other in graph[module]:
            visit(other)
        path.pop()
        done.add(module)

    for module in MODULES:
        visit(module)


def test_no_stage_imports_another_and_the_core_imports_no_role_package():
    roles = ("cnnpipe.stages.", "cnnpipe.experiments.", "cnnpipe.serving.")
    for module in MODULES:
        found = set(imported(module)) - {module}
        if module.startswith("cnnpipe.stages."):
            assert not [m for m in found if m.startswith("cnnpipe.stages.")], module
        elif not module.startswith(roles) and module != "cnnpipe.cli":
            # The core may be used by every role, so it uses none (parity and quantize, stages,
            # use serving's onnxruntime model; the core does not).
            assert not [m for m in found if m.startswith(roles)], module


def test_serving_imports_no_training_stack():
    serving = [m for m in MODULES if m.startswith("cnnpipe.serving")]
    code = (
        f"import sys, cnnpipe.cli; [__import__(m) for m in {serving!r}]; "
        "heavy = [m for m in ('torch', 'pytorch_lightning', 'mlflow') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_image_size_comes_from_the_data_not_from_code():
    """Only CIFAR-10's batch reader knows 32x32 (its file format); everything else reads the
    size from the prepared data, the checkpoint or the ONNX file (docstrings aside)."""
    holders = sorted(
        str(p.relative_to(ROOT / "src")) for p in (ROOT / "src").rglob("*.py")
        if re.search(r"^[^#\n\"]*\b32, 32\b", p.read_text(), re.MULTILINE)
    )  # fmt: skip
    assert holders == ["cnnpipe/cifar.py"]

"""The package's layout is its architecture: packages by the road the data travels, imports that
run one way along it, stages that stand alone, serving without the training stack, heavy
libraries loaded only when used, and the ONNX interface in one home."""

import ast
import pkgutil
import re
import shutil
import subprocess
import sys

import cnnpipe
from cnnpipe.base.sources import imported, path_of
from cnnpipe.cli import COMMANDS
from tests.helpers import ROOT

MODULES = [m.name for m in pkgutil.walk_packages(cnnpipe.__path__, "cnnpipe.")]
# The road, lowest floor first: each imports only the floors before it.
FLOORS = ["base", "data", "tracking", "training", "artifact"]
# The roles over the floors, and what each imports besides itself. Serving runs without the
# training stack: the one image decoder, the ONNX contract, and the registry to fetch a models:/
# URI; only the stages use serving's model.
ROLES = {
    "serving": ["base", "data.images", "data.drift", "artifact.contract", "tracking.registry"],
    "experiments": FLOORS,
    "chapter": FLOORS,
    "stages": [*FLOORS, "serving", "chapter"],
}
# The commands that read no params.yaml (they take files or folders).
NO_PARAMS = ("params", "predict", "serve", "review", "monitor", "share")
# What a command line must not import before its arguments and configuration are checked.
HEAVY = ("torch", "pytorch_lightning", "torchmetrics", "mlflow", "onnx", "optuna")


def may_import(package: str) -> list[str]:
    return FLOORS[: FLOORS.index(package)] if package in FLOORS else ROLES[package]


def test_the_top_level_is_the_cli_and_the_packages_of_the_road():
    top = sorted(m for m in MODULES if m.count(".") == 1)
    packages = sorted(f"cnnpipe.{p}" for p in [*FLOORS, *ROLES])
    assert top == sorted(["cnnpipe.cli", *packages])


def test_imports_run_down_the_road():
    for module in MODULES:
        if module == "cnnpipe.cli":
            continue
        package = module.split(".")[1]
        allowed = [f"cnnpipe.{p}" for p in [package, *may_import(package)]]
        for other in set(imported(module)) - {"cnnpipe"}:
            # A package's __init__ on the way to an allowed module imports nothing (tested).
            within = [a for a in allowed if a.startswith(f"{other}.")]
            assert within or any(other == a or other.startswith(f"{a}.") for a in allowed), (
                f"{module} imports {other}: {package} may import only {may_import(package)}"
            )
            if package == "stages":
                assert not other.startswith("cnnpipe.stages."), f"{module} imports {other}"


def test_each_package_says_what_it_may_import():
    for package in [*FLOORS, *ROLES]:
        doc = ast.get_docstring(ast.parse(path_of(f"cnnpipe.{package}").read_text()))
        said = re.search(r"May import: (.*)\.$", doc, re.DOTALL)
        assert said, f"cnnpipe/{package}/__init__.py does not say what it may import"
        names = [n.removeprefix("cnnpipe.") for n in re.split(r",\s*", said[1])]
        if names == ["nothing of cnnpipe above it"]:
            names = []
        assert names == may_import(package), package


def test_package_inits_import_nothing():
    """So that serving and bench/gpu_check.py load only the modules they use."""
    for module in MODULES:
        tree = ast.parse(path_of(module).read_text())
        if path_of(module).name == "__init__.py":
            assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], module


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


def test_serving_imports_no_training_stack():
    serving = [m for m in MODULES if m.startswith("cnnpipe.serving")]
    code = (
        f"import sys, cnnpipe.cli; [__import__(m) for m in {serving!r}]; "
        "heavy = [m for m in ('torch', 'pytorch_lightning', 'mlflow') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_and_config_errors_load_no_heavy_library(tmp_path):
    """Every command's --help, and a value the schema refuses (in params.yaml for the stages,
    on the command line for a Hydra job), answer before torch, Lightning or MLflow load."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf", ignore=shutil.ignore_patterns("local"))
    (tmp_path / "params.yaml").write_text("optim:\n  lr: fast\n")
    code = f"""
import contextlib, io, sys
from cnnpipe import cli
NO_PARAMS = {NO_PARAMS!r}
said = []
for argv in [*([c, "--help"] for c in cli.COMMANDS),
             *([c] for c in cli.COMMANDS if c not in NO_PARAMS),
             ["train", "optim.lr=fast"]]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            cli.main(argv)
        except SystemExit as exit:
            # Hydra prints a job's error itself and exits 1.
            said.append((argv, err.getvalue() if exit.code == 1 else exit.code))
heavy = [m for m in {HEAVY!r} if m in sys.modules]
assert not heavy, heavy
for argv, code in said:
    print(argv, str(code).strip().splitlines()[-1] if code else code)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # Every --help, every stage with the bad params.yaml, the Hydra job.
    assert len(lines) == len(COMMANDS) + len(COMMANDS) - len(NO_PARAMS) + 1
    for line in lines:
        if "--help" in line:
            assert line.endswith(" 0"), line
        else:
            assert "error: config key optim.lr" in line, line


def test_the_image_size_comes_from_the_data_not_from_code():
    """Only CIFAR-10's batch reader knows 32x32 (its file format); everything else reads the
    size from the prepared data, the checkpoint or the ONNX file (docstrings aside)."""
    holders = sorted(
        str(p.relative_to(ROOT / "src")) for p in (ROOT / "src").rglob("*.py")
        if re.search(r"^[^#\n\"]*\b32, 32\b", p.read_text(), re.MULTILINE)
    )  # fmt: skip
    assert holders == ["cnnpipe/data/cifar.py"]

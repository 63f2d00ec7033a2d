"""The source files a module runs: its own and those of every cnnpipe module it imports,
directly or inside a function, transitively. One rule for the code a DVC stage depends on
(tests/test_dvc_yaml.py holds dvc.yaml to it) and for the code a resumed training must share."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1]
# Networks are built by name from the config (Hydra's instantiate), not imported.
BY_NAME = {"cnnpipe.training.classifier": ["cnnpipe.training.models"]}


def path_of(module: str) -> Path:
    """`cnnpipe.stages.train` -> <package>/stages/train.py; `cnnpipe.stages` ->
    <package>/stages/__init__.py."""
    folder = PACKAGE.joinpath(*module.split(".")[1:])
    return folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")


def imported(module: str) -> list[str]:
    """The cnnpipe modules `module`'s source imports anywhere in it."""
    found = list(BY_NAME.get(module, []))
    for node in ast.walk(ast.parse(path_of(module).read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "cnnpipe"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "cnnpipe":
            found.append(node.module)
            # `from cnnpipe import tracking` imports a module; `import PipelineError`, a name.
            found += [f"{node.module}.{a.name}" for a in node.names]
    return [m for m in found if path_of(m).is_file()]


def source_files(module: str) -> list[Path]:
    """`module`'s file and the files of what it imports, transitively, with the `__init__.py` of
    each package on the way (Python runs them first), sorted."""
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            parts = name.split(".")
            todo += imported(name) + [".".join(parts[:i]) for i in range(1, len(parts))]
    return sorted(path_of(m) for m in seen)

"""The source files a module runs: its own and those of every cnnpipe module it imports,
directly or inside a function, transitively. One rule for the code a DVC stage depends on
(tests/test_dvc_yaml.py holds dvc.yaml to it) and for the code a resumed training must share."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent
# Networks are built by name from the config (Hydra's instantiate), not imported.
BY_NAME = {"cnnpipe.module": ["cnnpipe.models"]}


def path_of(module: str) -> Path:
    """`cnnpipe.train` -> <package>/train.py; `cnnpipe` -> <package>/__init__.py."""
    name = module.removeprefix("cnnpipe").removeprefix(".")
    return PACKAGE / (f"{name}.py" if name else "__init__.py")


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
    """`module`'s file and the files of what it imports, transitively, sorted."""
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += imported(name)
    return sorted(path_of(m) for m in seen)

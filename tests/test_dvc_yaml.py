"""dvc.yaml's code dependencies follow one rule: a stage depends on its module's source and on
that of every cnnpipe module it imports, transitively (cnnpipe.base.sources)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from cnnpipe.base.sources import imported, source_files
from cnnpipe.training.fit import RECIPE_KEYS
from tests.helpers import ROOT


def test_each_stage_depends_on_the_code_it_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        command = stage["cmd"].split()
        assert command[:2] == ["cnnpipe", name.replace("_", "-")]
        listed = sorted(d for d in stage["deps"] if d.startswith("src/"))
        wanted = sorted(str(p.relative_to(ROOT)) for p in source_files(f"cnnpipe.stages.{name}"))
        assert listed == wanted, f"stage {name}: dvc.yaml should list {wanted}"


def test_imports_inside_functions_and_modules_named_in_from_imports_count(tmp_path, monkeypatch):
    package = tmp_path / "cnnpipe"
    package.mkdir()
    (package / "__init__.py").write_text("class PipelineError(Exception): ...\n")
    (package / "a.py").write_text("from cnnpipe import PipelineError, b\n")
    (package / "b.py").write_text("def f():\n    import cnnpipe.c\n")
    (package / "c.py").write_text("import os\n")
    (package / "unused.py").write_text("")
    monkeypatch.setattr("cnnpipe.base.sources.PACKAGE", package)
    assert sorted(imported("cnnpipe.a")) == ["cnnpipe", "cnnpipe.b"]
    names = [p.name for p in source_files("cnnpipe.a")]
    assert names == ["__init__.py", "a.py", "b.py", "c.py"]


def test_the_train_stage_depends_on_the_recipe_a_resume_shares():
    train = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]
    assert train["params"] == RECIPE_KEYS


def test_editing_the_prepare_stage_reruns_only_prepare(tmp_path):
    """A real `dvc status` in a git repository laid out like ours: every stage's dependencies
    and outputs recorded by `dvc commit`, then a comment added to stages/prepare.py."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "conf", repo / "conf", ignore=shutil.ignore_patterns("local"))
    for name in ("dvc.yaml", "params.yaml", "data/labelled/README.txt"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for stage in stages.values():
        for out in [*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]:
            key = (next(iter(out)) if isinstance(out, dict) else out)[len("${paths.") : -1]
            path = repo / params["paths"][key]
            # Folders (data, baseline, int8) have no suffix; files do.
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(key)
            else:
                path.mkdir(parents=True, exist_ok=True)
                (path / "placeholder").write_text(key)

    def run(*command: str) -> str:
        done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    dvc = str(Path(sys.executable).parent / "dvc")
    run("git", "init", "-q")
    run(dvc, "init", "-q")
    run(dvc, "commit", "-f", "-q")
    assert json.loads(run(dvc, "status", "--json")) == {}
    with open(repo / "src/cnnpipe/stages/prepare.py", "a") as f:
        f.write("# edited\n")
    assert list(json.loads(run(dvc, "status", "--json"))) == ["prepare"]

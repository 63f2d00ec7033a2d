"""dvc.yaml's code dependencies follow one rule: a stage depends on its module's source and on
that of every cnnpipe module it imports, transitively (cnnpipe.sources)."""

import yaml

from cnnpipe.sources import imported, source_files
from tests.helpers import ROOT


def test_each_stage_depends_on_the_code_it_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        command = stage["cmd"].split()
        assert command[:2] == ["cnnpipe", name.replace("_", "-")]
        listed = sorted(d for d in stage["deps"] if d.startswith("src/"))
        wanted = sorted(str(p.relative_to(ROOT)) for p in source_files(f"cnnpipe.{name}"))
        assert listed == wanted, f"stage {name}: dvc.yaml should list {wanted}"


def test_imports_inside_functions_and_modules_named_in_from_imports_count(tmp_path, monkeypatch):
    package = tmp_path / "cnnpipe"
    package.mkdir()
    (package / "__init__.py").write_text("class PipelineError(Exception): ...\n")
    (package / "a.py").write_text("from cnnpipe import PipelineError, b\n")
    (package / "b.py").write_text("def f():\n    import cnnpipe.c\n")
    (package / "c.py").write_text("import os\n")
    (package / "unused.py").write_text("")
    monkeypatch.setattr("cnnpipe.sources.PACKAGE", package)
    assert sorted(imported("cnnpipe.a")) == ["cnnpipe", "cnnpipe.b"]
    names = [p.name for p in source_files("cnnpipe.a")]
    assert names == ["__init__.py", "a.py", "b.py", "c.py"]

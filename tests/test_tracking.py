import json

import pytest
from omegaconf import OmegaConf

from cnnpipe import PipelineError
from cnnpipe.tracking import flatten, read_run_id, tracking_uri


def test_default_store_is_sqlite_in_the_dvc_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking_uri("http://mlflow.example:5000") == "http://mlflow.example:5000"


def test_environment_overrides_the_store(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////srv/team.db")
    assert tracking_uri("http://configured") == "sqlite:////srv/team.db"


def test_flatten_gives_dotted_string_params():
    cfg = OmegaConf.create({"optim": {"lr": 0.005}, "data": {"mean": [0.1, 0.2]}, "seed": 0})
    assert flatten(cfg) == {"optim.lr": "0.005", "data.mean": "[0.1, 0.2]", "seed": "0"}


def test_missing_run_file_says_which_stage_to_run(tmp_path):
    with pytest.raises(PipelineError, match="dvc repro train"):
        read_run_id(tmp_path / "mlflow_run.json")
    (tmp_path / "ok.json").write_text(json.dumps({"run_id": "r1"}))
    assert read_run_id(tmp_path / "ok.json") == "r1"

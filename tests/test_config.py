import shutil
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cnnpipe import PipelineError
from cnnpipe.base.config import compose_params
from tests.helpers import ROOT


def shipped_conf(dest: Path) -> Path:
    """conf/ as committed: without this machine's conf/local/."""
    shutil.copytree(ROOT / "conf", dest / "conf", ignore=shutil.ignore_patterns("local"))
    return dest / "conf"


def test_params_yaml_is_the_composed_default(tmp_path):
    committed = (ROOT / "params.yaml").read_text()
    assert committed == compose_params(conf_dir=shipped_conf(tmp_path)), (
        "params.yaml drifted from conf/: run `make params` and commit it"
    )


def test_local_settings_go_over_everything_but_the_command_line(tmp_path):
    conf = shipped_conf(tmp_path)
    (conf / "local").mkdir()
    md5 = "5912d72513c2fa989e976f23c36e7bc6"
    local = f"data:\n  source: /archives/cifar-10-python.tar.gz\n  md5: {md5}\nseed: 7\n"
    (conf / "local" / "default.yaml").write_text(local)
    cfg = OmegaConf.create(compose_params(["seed=3"], conf_dir=conf))
    assert cfg.data.source == "/archives/cifar-10-python.tar.gz" and cfg.data.md5 == md5
    assert cfg.seed == 3
    assert cfg.data.timeout_s == 60, "the rest of the node stays"


def test_a_data_choice_in_local_settings_outlives_other_overrides(tmp_path):
    """docs/own-images.md: the folder chosen once in conf/local stays chosen when `dvc exp run -S`
    (Hydra overrides) changes something else, and the command line can still choose again."""
    conf = shipped_conf(tmp_path)
    (conf / "local").mkdir()
    local = "defaults:\n  - override /data: folder\ndata:\n  source: /home/me/leaves\n"
    (conf / "local" / "default.yaml").write_text(local)
    cfg = OmegaConf.create(compose_params(["optim.lr=0.01"], conf_dir=conf))
    assert (cfg.data.layout, cfg.data.source, cfg.optim.lr) == (
        "image_folder",
        "/home/me/leaves",
        0.01,
    )
    assert cfg.data.dependency == "/home/me/leaves", "DVC watches the folder itself"
    assert OmegaConf.create(compose_params(["data=cifar10"], conf_dir=conf)).data.layout == (
        "cifar10_batches"
    )


def test_gitignore_keeps_local_settings_out_of_git():
    ignored = subprocess.run(
        ["git", "check-ignore", "conf/local/default.yaml"], cwd=ROOT, capture_output=True
    )
    assert ignored.returncode == 0


def test_overrides_compose_into_params():
    cfg = OmegaConf.create(
        compose_params(["trainer.max_epochs=3", "optim.lr=0.01"], conf_dir=ROOT / "conf")
    )
    assert cfg.trainer.max_epochs == 3
    assert cfg.optim.lr == 0.01
    assert cfg.model._target_ == "cnnpipe.training.models.ChapterCNN"


def test_default_points_at_the_official_archive():
    cfg = OmegaConf.load(ROOT / "params.yaml")
    assert cfg.data.source == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert cfg.data.md5 == "c58f30108f718f92721af3b95e74349a"


def test_dvc_composes_params_through_hydra():
    dvc_config = (ROOT / ".dvc" / "config").read_text()
    assert "[hydra]" in dvc_config and "enabled = true" in dvc_config


def test_an_unknown_choice_of_every_group_names_the_group_and_its_options():
    for group in sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir()):
        if group in ("hydra", "local"):
            continue
        options = sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
        with pytest.raises(PipelineError) as error:
            compose_params([f"{group}=does_not_exist"], conf_dir=ROOT / "conf")
        assert str(error.value) == (
            f"conf/{group} has no does_not_exist; choose one of: {', '.join(options)}"
        )


def test_an_unknown_choice_is_left_to_hydra_outside_cnnpipe_and_for_optional_groups(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "small.yaml").write_text("width: 1\n")
    (tmp_path / "config.yaml").write_text("defaults:\n  - model: small\n")
    refused = pytest.raises(MissingConfigException, match="Could not find 'model/big'")
    with initialize_config_dir(str(tmp_path), version_base=None), refused:
        compose(config_name="config", overrides=["model=big"])
    # cnnpipe's optional conf/local/default.yaml stays optional: params.yaml has no mark.
    assert "unknown_choice" not in compose_params(conf_dir=ROOT / "conf")

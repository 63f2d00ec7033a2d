from pathlib import Path

from omegaconf import OmegaConf

from cnnpipe.config import compose_params

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_is_the_composed_default():
    committed = (ROOT / "params.yaml").read_text()
    assert committed == compose_params(conf_dir=ROOT / "conf"), (
        "params.yaml drifted from conf/: run `make params` and commit it"
    )


def test_overrides_compose_into_params():
    cfg = OmegaConf.create(
        compose_params(["trainer.max_epochs=3", "optim.lr=0.01"], conf_dir=ROOT / "conf")
    )
    assert cfg.trainer.max_epochs == 3
    assert cfg.optim.lr == 0.01
    assert cfg.model._target_ == "cnnpipe.models.ChapterCNN"


def test_default_points_at_the_official_archive():
    cfg = OmegaConf.load(ROOT / "params.yaml")
    assert cfg.data.url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert cfg.data.md5 == "c58f30108f718f92721af3b95e74349a"


def test_dvc_composes_params_through_hydra():
    dvc_config = (ROOT / ".dvc" / "config").read_text()
    assert "[hydra]" in dvc_config and "enabled = true" in dvc_config

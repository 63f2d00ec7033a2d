"""Compose conf/ into params.yaml, and load the configuration a stage runs with."""

import argparse
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from cnnpipe.files import atomic_path
from cnnpipe.schema import validate

CONF_DIR = Path("conf")
PARAMS_FILE = Path("params.yaml")


def compose_params(overrides: list[str] = (), conf_dir: Path = CONF_DIR) -> str:
    """The composed configuration as YAML, written exactly as `dvc exp run` writes params.yaml."""
    with initialize_config_dir(str(conf_dir.resolve()), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)


def load_params(path: Path = PARAMS_FILE) -> DictConfig:
    """params.yaml, checked against the schema before a stage does any work."""
    return validate(OmegaConf.load(path))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="cnnpipe params", description="Regenerate params.yaml from conf/."
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.max_epochs=1")
    args = parser.parse_args(argv)
    params = compose_params(args.overrides)
    validate(OmegaConf.create(params))
    with atomic_path(PARAMS_FILE) as tmp:
        tmp.write_text(params)
    print(f"wrote {PARAMS_FILE}")

"""Compose conf/ into params.yaml, and load the configuration a stage runs with."""

import re
from collections.abc import Mapping
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from cnnpipe import PipelineError
from cnnpipe.base.args import Parser
from cnnpipe.base.files import atomic_path
from cnnpipe.base.schema import unknown_choice, validate

CONF_DIR = Path("conf")
PARAMS_FILE = Path("params.yaml")


def compose_params(overrides: list[str] = (), conf_dir: Path = CONF_DIR) -> str:
    """The composed configuration as YAML, written exactly as `dvc exp run` writes params.yaml."""
    if not (conf_dir / "config.yaml").is_file():
        raise PipelineError(f"no {conf_dir / 'config.yaml'}; run this in the repository root")
    check_local(conf_dir / "local" / "default.yaml")
    try:
        with initialize_config_dir(str(conf_dir.resolve()), version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides))
    except HydraException as error:
        # Hydra suggests `+key=value` for a key conf/ lacks; the schema would refuse that too.
        if unknown := re.match(r"Could not override '([^']+)'", str(error)):
            raise PipelineError(
                f"conf/ has no setting {unknown[1]}; see params.yaml for the settings there are"
            ) from None
        message = str(error).split("Config search path")[0]  # the paths Hydra searched
        raise PipelineError(" ".join(message.split())) from None
    if problem := unknown_choice(cfg):
        raise PipelineError(problem)
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)


def check_local(path: Path) -> None:
    """Refuse an archive set for every data choice in `path`: a folder run would take CIFAR-10's
    archive as its source, and fail on its md5 at best."""
    if not path.is_file():
        return
    try:
        local = OmegaConf.load(path)
    except (yaml.YAMLError, ValueError):
        return  # Hydra says what is wrong with the file when it composes it
    data = local.get("data") if isinstance(local, DictConfig) else None
    if not isinstance(data, DictConfig):
        return
    # A file that also chooses the data (`override /data: folder`) sets that choice's source.
    chosen = any("/data" in str(d) for d in local.get("defaults", []))
    if not chosen and {"source", "md5"} & set(data):
        raise PipelineError(
            f"{path} sets data.source or data.md5 for every data choice; move them, without "
            "`data:`, to conf/local/data/cifar10.yaml (or the choice they belong to) "
            "(docs/pipeline.md, Offline)"
        )


def outputs_under(cfg: DictConfig, folder: str | Path) -> DictConfig:
    """`cfg` with every output path moved under `folder`, the data left where it is: a sweep's
    job, the baseline stage and the benches each write a whole pipeline's outputs elsewhere."""
    moved = {key: str(Path(folder) / path) for key, path in cfg.paths.items() if key != "data"}
    return OmegaConf.merge(cfg, {"paths": moved})


def output_roots(cfg: DictConfig) -> list[Path]:
    """The folders the outputs in `cfg.paths` lie in, where a killed stage may have left
    temporary files: the top folder of each path in the repository (data, models, metrics,
    ...), the parent of one elsewhere."""
    paths = [Path(path) for path in cfg.paths.values()]
    return sorted({p.parent if p.is_absolute() else Path(p.parts[0]) for p in paths})


def baseline_config(cfg: DictConfig) -> DictConfig:
    """`cfg` with the baseline network in place of the model and its outputs in paths.baseline,
    its resume state beside the train stage's: not inside the folder DVC tracks."""
    moved = outputs_under(OmegaConf.merge(cfg, {"model": cfg.baseline.model}), cfg.paths.baseline)
    resume = Path(cfg.paths.resume).with_name("baseline")
    return OmegaConf.merge(moved, {"paths": {"resume": str(resume)}})


def dataset_name(data: Mapping) -> str:
    """data.name, else the source folder's or archive's name: /home/me/leaves.zip -> leaves."""
    if data.get("name"):
        return data["name"]
    name = Path(str(data.get("source") or "images").rstrip("/")).name
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        name = name.removesuffix(suffix)
    # It names the registered model, whose name takes no slashes or spaces.
    return re.sub(r"[^\w.-]+", "-", name) or "images"


def registered_name(cfg: DictConfig) -> str:
    """The registry's name for the models: mlflow.model_name, else cnnpipe-<data set name>."""
    return cfg.mlflow.model_name or f"cnnpipe-{dataset_name(cfg.data)}"


def network_name(model: Mapping | str) -> str:
    """A network's class name, from its config node or `_target_`: "ChapterCNN"."""
    target = model if isinstance(model, str) else model["_target_"]
    return target.rsplit(".", 1)[-1]


def load_params(path: Path = PARAMS_FILE) -> DictConfig:
    """params.yaml, checked against the schema before a stage does any work."""
    try:
        return validate(OmegaConf.load(path))
    except FileNotFoundError:
        raise PipelineError(
            f"no {path} here; run the stages in the repository root, or make it with "
            "`cnnpipe params`"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise PipelineError(
            f"{path} is not valid YAML ({problem}{where}); fix it, or remake it with "
            "`cnnpipe params`"
        ) from None


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="cnnpipe params", description="Regenerate params.yaml from conf/.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.max_epochs=1")
    args = parser.parse_args(argv)
    params = compose_params(args.overrides)
    validate(OmegaConf.create(params))
    with atomic_path(PARAMS_FILE) as tmp:
        tmp.write_text(params)
    print(f"wrote {PARAMS_FILE}")

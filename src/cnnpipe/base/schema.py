"""The configuration's schema: unknown keys, wrong types and impossible values are refused up
front, naming the key, before any stage does work."""

from dataclasses import dataclass, field, fields, is_dataclass
from types import UnionType
from typing import Any, get_args, get_origin

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnnpipe import PipelineError
from hydra_plugins.cnnpipe_choices.unknown_choice import UNKNOWN_CHOICE

# Settings that say where things are or how fast they run, not what is computed: left out of the
# MLflow params, so comparing runs shows only differences in the recipe.
NOT_RECIPE = {"recipe": False}


@dataclass
class Data:
    layout: str
    image_size: int
    mean: list[float] | None
    std: list[float] | None
    crop_padding: int
    flip: bool
    # Where the images come from and how they are read: the runs record the data by content
    # (an MLflow dataset), whichever copy it came from.
    name: str | None = field(default=None, metadata=NOT_RECIPE)
    source: str | None = field(default=None, metadata=NOT_RECIPE)
    md5: str | None = field(default=None, metadata=NOT_RECIPE)
    timeout_s: float = field(default=60, metadata=NOT_RECIPE)
    dependency: str | None = field(default=None, metadata=NOT_RECIPE)
    skip_unreadable: bool = field(default=False, metadata=NOT_RECIPE)
    # A folder of labelled images added to the training split; its images are in the data's
    # digest, its place is not the recipe's.
    extra_train: str | None = field(default=None, metadata=NOT_RECIPE)
    # A count (CIFAR-10's recipe) or fractions held out by hash (a folder).
    val_size: int | None = None
    val_fraction: float | None = None
    test_fraction: float | None = None


@dataclass
class Optim:
    lr: float
    weight_decay: float
    pct_start: float
    label_smoothing: float
    ema_decay: float | None
    ema_every_n_steps: int
    whiten: bool
    # Hydra nodes with _target_ (cnnpipe.training.classifier.LitClassifier.configure_optimizers).
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)


@dataclass
class Loader:
    batch_size: int
    channels_last: bool
    # The datamodule's class (cnnpipe.training.build.datamodule).
    _target_: str = "cnnpipe.data.loader.ImageDataModule"


@dataclass
class MLflow:
    tracking_uri: str | None
    experiment: str
    model_name: str | None


@dataclass
class Tta:
    views: list[str]
    shift: int


@dataclass
class Evaluate:
    batch_size: int = field(metadata=NOT_RECIPE)
    tta: Tta


@dataclass
class Report:
    dense_baselines: list[list[int]]


@dataclass
class Export:
    opset: int
    check_batch_sizes: list[int]


@dataclass
class Chapter:
    feature_map_images: int
    maps_per_layer: int
    shifts: list[int]
    mistakes: int


@dataclass
class Quantize:
    calibration_images: int
    max_accuracy_drop: float
    min_speedup: float
    batch_size: int


@dataclass
class Parity:
    atol: float
    batch_size: int = field(metadata=NOT_RECIPE)


@dataclass
class Promote:
    alpha: float = field(metadata=NOT_RECIPE)
    batch_size: int = field(metadata=NOT_RECIPE)


@dataclass
class Config:
    data: Data
    optim: Optim
    loader: Loader
    mlflow: MLflow = field(metadata=NOT_RECIPE)
    evaluate: Evaluate
    report: Report
    export: Export
    chapter: Chapter
    quantize: Quantize
    parity: Parity
    promote: Promote
    seed: int
    # Networks differ in their arguments; Hydra's instantiate checks them when it builds one.
    model: dict[str, Any] = field(default_factory=dict)
    # pytorch_lightning.Trainer's arguments, which it checks itself
    # (cnnpipe.training.build.trainer).
    trainer: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict, metadata=NOT_RECIPE)
    baseline: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict, metadata=NOT_RECIPE)


POSITIVE = [
    "data.timeout_s", "data.image_size", "optim.lr", "trainer.max_epochs", "loader.batch_size",
    "evaluate.batch_size", "export.opset",
    "chapter.mistakes", "chapter.feature_map_images", "chapter.maps_per_layer",
    "quantize.calibration_images", "quantize.batch_size", "parity.atol", "parity.batch_size",
    "promote.batch_size",
]  # fmt: skip
NOT_NEGATIVE = [
    "data.crop_padding", "optim.weight_decay", "quantize.max_accuracy_drop", "quantize.min_speedup",
]  # fmt: skip
# The largest data.image_size: a 1024x1024 image is 3 MB a row of the prepared arrays, and the
# chapter's network on it has 258 million parameters.
MAX_IMAGE_SIZE = 1024
# The test-time views by name (cnnpipe.training.inference.tta_views); each costs a pass of the
# network.
TTA_VIEWS = (
    "image", "mirror",
    "image_up_left", "image_down_right", "mirror_up_left", "mirror_down_right",
)  # fmt: skip
PRECISIONS = {"auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true"}
# Keys of the untyped groups (Lightning's Trainer checks the rest itself) that cnnpipe reads.
UNTYPED = {
    "trainer.max_epochs": (int, "an integer"),
    "trainer.precision": ((str, int), "a precision such as 32-true"),
}


def recipe(cfg: DictConfig) -> dict:
    """`cfg` as a plain dict without the NOT_RECIPE settings (nor keys the schema lacks, such as
    Hydra's own node)."""

    def keep(node: dict, schema: type) -> dict:
        out = {}
        for f in fields(schema):
            if f.name not in node or f.metadata == NOT_RECIPE:
                continue
            if f.default is None and node[f.name] is None:  # an option this variant lacks
                continue
            out[f.name] = keep(node[f.name], f.type) if is_dataclass(f.type) else node[f.name]
        return out

    known = [f.name for f in fields(Config) if f.name in cfg]
    return keep(OmegaConf.to_container(OmegaConf.masked_copy(cfg, known), resolve=True), Config)


def misshapen(node: DictConfig, schema: type, prefix: str = "") -> str | None:
    """The first key whose value is a mapping where the schema has a list, or the other way
    round: OmegaConf refuses the merge without naming it."""
    for f in fields(schema):
        value = node.get(f.name) if OmegaConf.is_dict(node) else None
        if value is None:
            continue
        kind = f.type
        if isinstance(kind, UnionType):  # `list[float] | None`: the list
            kind = next(arg for arg in get_args(kind) if arg is not type(None))
        if is_dataclass(kind):
            if not OmegaConf.is_dict(value):
                return f"{prefix}{f.name}"
            if found := misshapen(value, kind, f"{prefix}{f.name}."):
                return found
        elif get_origin(kind) is list:
            if not OmegaConf.is_list(value):
                return f"{prefix}{f.name}"
            if get_origin(get_args(kind)[0]) is list:  # a list of lists
                for i, item in enumerate(value):
                    if not OmegaConf.is_list(item):
                        return f"{prefix}{f.name}[{i}]"
        elif get_origin(kind) is dict and not OmegaConf.is_dict(value):
            return f"{prefix}{f.name}"
    return None


def unknown_choice(node: Any) -> str | None:
    """The line for the first unknown choice of a config group composed into `node`, if any
    (hydra_plugins/cnnpipe_choices marks it)."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        if choice := node.get(UNKNOWN_CHOICE):
            options = ", ".join(choice["options"])
            return f"conf/{choice['group']} has no {choice['name']}; choose one of: {options}"
        return next(filter(None, map(unknown_choice, node.values())), None)
    return None


def data_problems(data: DictConfig) -> list[str]:
    """What is impossible in the data group: its statistics, and how it is split."""
    problems = []
    if (data.mean is None) != (data.std is None):
        problems.append("data.mean and data.std are both numbers or both null (computed)")
    elif data.mean is not None and (
        len(data.mean) != 3 or len(data.std) != 3 or min(data.std) <= 0
    ):
        problems.append("data.mean and data.std need 3 values each, std > 0")
    if (data.val_size is None) == (data.val_fraction is None):
        problems.append("the data group needs one of data.val_size and data.val_fraction")
    if data.val_size is not None and data.val_size <= 0:
        problems.append(f"data.val_size={data.val_size} must be > 0")
    shares = {k: data[k] for k in ("val_fraction", "test_fraction") if data[k] is not None}
    for key, share in shares.items():
        if not 0 < share < 1:
            problems.append(f"data.{key}={share} must lie between 0 and 1")
    if sum(shares.values()) >= 1:
        problems.append("data.val_fraction and data.test_fraction leave no training images")
    if data.layout == "image_folder" and data.test_fraction is None:
        problems.append("data.test_fraction is needed for a folder without a test/ split")
    return problems


def validate(cfg: DictConfig) -> DictConfig:
    """`cfg` checked against the schema; a PipelineError names the first offending key."""
    if problem := unknown_choice(cfg):
        raise PipelineError(problem)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    except OmegaConfBaseException as error:
        reason = str(error.msg).splitlines()[0] if error.msg else type(error).__name__
        key = error.full_key or misshapen(cfg, Config) or "?"
        raise PipelineError(f"config key {key}: {reason}") from None
    if missing := sorted(OmegaConf.missing_keys(cfg)):
        raise PipelineError(
            f"config keys missing: {', '.join(missing)}; regenerate params.yaml with "
            "`cnnpipe params` or add them to conf/"
        )
    # Types before ranges: the schema's dataclasses typed every other key in the merge above.
    for key, path in cfg.paths.items():
        if not isinstance(path, str) or not path:
            raise PipelineError(f"config key paths.{key}: {path!r} is not a path")
    for key, (kinds, name) in UNTYPED.items():
        value = OmegaConf.select(cfg, key, default=1)
        if isinstance(value, bool) or not isinstance(value, kinds):
            shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            raise PipelineError(f"config key {key}: {shown!r} is not {name}")
    for i, dense in enumerate(cfg.report.dense_baselines):
        if len(dense) != 4:
            raise PipelineError(
                f"config key report.dense_baselines[{i}]: {list(dense)} is not [height, width, "
                "channels, units]"
            )
    problems = []
    for key in POSITIVE:
        if not OmegaConf.select(cfg, key, default=0) > 0:
            problems.append(f"{key}={OmegaConf.select(cfg, key)} must be > 0")
    for key in NOT_NEGATIVE:
        if OmegaConf.select(cfg, key) < 0:
            problems.append(f"{key}={OmegaConf.select(cfg, key)} must be >= 0")
    if cfg.data.image_size > MAX_IMAGE_SIZE:
        problems.append(f"data.image_size={cfg.data.image_size} must be <= {MAX_IMAGE_SIZE}")
    if not 0 < cfg.promote.alpha < 1:
        problems.append(f"promote.alpha={cfg.promote.alpha} must be between 0 and 1")
    if not 0 < cfg.optim.pct_start < 1:
        problems.append(f"optim.pct_start={cfg.optim.pct_start} must lie between 0 and 1")
    if not 0 <= cfg.optim.label_smoothing < 1:
        problems.append(f"optim.label_smoothing={cfg.optim.label_smoothing} must lie in [0, 1)")
    if str(cfg.trainer.get("precision", "32-true")) not in PRECISIONS:
        problems.append(
            f"config key trainer.precision: {cfg.trainer.precision!r} is not one of "
            f"{sorted(PRECISIONS)}"
        )
    problems += data_problems(cfg.data)
    problems += tta_problems(cfg.evaluate.tta, cfg.data.flip)
    if problems:
        raise PipelineError("; ".join(problems))
    return cfg


def tta_problems(tta: DictConfig, flip: bool) -> list[str]:
    """What is wrong with evaluate.tta: unknown or repeated views, mirrors the data forbids."""
    views = list(tta.views)
    if unknown := [v for v in views if v not in TTA_VIEWS]:
        return [f"config key evaluate.tta.views: {unknown} unknown; choose from {list(TTA_VIEWS)}"]
    if not views or len(set(views)) < len(views):
        return [f"evaluate.tta.views={views} must name each view once, at least one"]
    problems = []
    if not flip and (mirrors := [v for v in views if v.startswith("mirror")]):
        problems.append(
            f"evaluate.tta.views has {mirrors} but data.flip is false (a mirror image may be "
            "another class): set evaluate.tta.views=[image,image_up_left,image_down_right]"
        )
    if tta.shift < 1 and any(v.endswith(("up_left", "down_right")) for v in views):
        problems.append(f"evaluate.tta.shift={tta.shift} must be >= 1 for the moved views")
    return problems

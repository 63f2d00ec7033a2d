import copy
from dataclasses import fields, is_dataclass
from types import UnionType
from typing import Any, Union, get_args, get_origin

import pytest
from omegaconf import OmegaConf

from cnnpipe import PipelineError
from cnnpipe.base.schema import UNTYPED, Config, validate
from cnnpipe.tracking.lineage import flatten
from tests.helpers import ROOT, composed

SHIPPED = [
    f"{group}={path.stem}"
    for group in ("data", "model", "optim", "loader", "trainer")
    for path in sorted((ROOT / "conf" / group).glob("*.yaml"))
]


@pytest.mark.parametrize("choice", SHIPPED)
def test_every_shipped_choice_is_valid_and_kept_as_composed(choice):
    cfg = composed(choice)
    checked = validate(cfg)
    for key, value in flatten(OmegaConf.to_container(cfg)).items():
        assert OmegaConf.select(checked, key) == value, key


@pytest.mark.parametrize(
    "override, message",
    [
        ("+loader.batch=3", "config key loader.batch: Key 'batch' not in 'Loader'"),
        ("+foo=1", "config key foo: Key 'foo' not in 'Config'"),
        ("loader.batch_size=abc", "config key loader.batch_size: Value 'abc'"),
        ("data.flip=maybe", "config key data.flip"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 must be > 0"),
        ("loader.batch_size=-8", "loader.batch_size=-8 must be > 0"),
        ("optim.lr=-1", "optim.lr=-1.0 must be > 0"),
        ("data.val_size=0", "data.val_size=0 must be > 0"),
        ("optim.pct_start=1.5", "optim.pct_start=1.5 must lie between 0 and 1"),
        ("trainer.precision=fp8", "config key trainer.precision: 'fp8' is not one of"),
        ("data.std=[0.2,0.2,0]", "data.mean and data.std need 3 values each, std > 0"),
        ("~loader.batch_size", "config keys missing: loader.batch_size; regenerate params.yaml"),
        (
            "evaluate.tta.views=[image,sideways]",
            "config key evaluate.tta.views: ['sideways'] unknown",
        ),
        ("evaluate.tta.views=[image,image]", "evaluate.tta.views=['image', 'image'] must name"),
        ("evaluate.tta.shift=0", "evaluate.tta.shift=0 must be >= 1 for the moved views"),
        (
            "data.flip=false",
            "evaluate.tta.views has ['mirror_up_left', 'mirror_down_right'] but data.flip is false",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_key(override, message):
    with pytest.raises(PipelineError) as error:
        validate(composed(override))
    assert message in str(error.value) and "\n" not in str(error.value)


DEFAULT = composed()


def typed_keys(schema: type = Config, prefix: str = "") -> list[tuple[str, object]]:
    """Every leaf key of the schema's dataclasses with its type, and the untyped ones cnnpipe
    reads."""
    keys = []
    for f in fields(schema):
        if is_dataclass(f.type):
            keys += typed_keys(f.type, f"{prefix}{f.name}.")
        elif f.type == dict[str, str]:  # paths: every key a string
            keys += [(f"{prefix}{f.name}.{k}", str) for k in DEFAULT[f.name]]
        elif f.type != dict[str, Any]:
            keys.append((f"{prefix}{f.name}", f.type))
    return keys if prefix else keys + [(k, kinds) for k, (kinds, _) in UNTYPED.items()]


def wrong_values(kind: object) -> list:
    """Values that are not of `kind`, whatever it is: text, a list, a mapping, nothing."""
    optional = get_origin(kind) in (Union, UnionType) and type(None) in get_args(kind)
    if optional:
        (kind,) = [k for k in get_args(kind) if k is not type(None)]
    values = [{"a": 1}] + ([] if optional else [None])
    if kind is not str:
        values.append("abc")
    values.append(["abc"] if get_origin(kind) is list else [1])
    return values


@pytest.mark.parametrize("key, kind", typed_keys(), ids=[k for k, _ in typed_keys()])
def test_every_typed_key_refuses_every_kind_of_wrong_value_in_one_line(key, kind):
    for value in wrong_values(kind):
        cfg = copy.deepcopy(DEFAULT)
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        with pytest.raises(PipelineError) as error:
            validate(cfg)
        message = str(error.value)
        assert message.startswith(f"config key {key}") and "\n" not in message, (value, message)

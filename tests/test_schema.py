from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cnnpipe import PipelineError
from cnnpipe.config import compose_params
from cnnpipe.schema import validate

ROOT = Path(__file__).resolve().parents[1]


def composed(*overrides: str):
    return OmegaConf.create(compose_params(list(overrides), conf_dir=ROOT / "conf"))


def test_every_shipped_choice_is_valid():
    for overrides in ([], ["model=resnet9"], ["model=chapter_cnn_bn"], ["trainer=gpu"]):
        assert validate(composed(*overrides)).trainer.batch_size > 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("+trainer.max_epoch=3", "config key trainer.max_epoch: Key 'max_epoch' not in 'Trainer'"),
        ("+foo=1", "config key foo: Key 'foo' not in 'Config'"),
        ("trainer.batch_size=abc", "config key trainer.batch_size: Value 'abc'"),
        ("data.flip=maybe", "config key data.flip"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 must be > 0"),
        ("trainer.batch_size=-8", "trainer.batch_size=-8 must be > 0"),
        ("optim.lr=-1", "optim.lr=-1.0 must be > 0"),
        ("data.val_size=0", "data.val_size=0 must be > 0"),
        ("optim.pct_start=1.5", "optim.pct_start=1.5 must lie between 0 and 1"),
        ("trainer.precision=fp8", "trainer.precision=fp8 is not one of"),
        ("data.std=[0.2,0.2,0]", "data.mean and data.std need 3 values each, std > 0"),
        ("~trainer.num_nodes", "config keys missing: trainer.num_nodes; regenerate params.yaml"),
    ],
)
def test_bad_values_are_refused_naming_the_key(override, message):
    with pytest.raises(PipelineError) as error:
        validate(composed(override))
    assert message in str(error.value) and "\n" not in str(error.value)

import pytest

from cnnpipe import PipelineError
from cnnpipe.schema import validate
from tests.helpers import composed


def test_every_shipped_choice_is_valid():
    for overrides in ([], ["model=resnet9"], ["model=chapter_cnn_bn"], ["trainer=gpu"]):
        assert validate(composed(*overrides)).loader.batch_size > 0


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
        ("trainer.precision=fp8", "trainer.precision=fp8 is not one of"),
        ("data.std=[0.2,0.2,0]", "data.mean and data.std need 3 values each, std > 0"),
        ("~loader.batch_size", "config keys missing: loader.batch_size; regenerate params.yaml"),
    ],
)
def test_bad_values_are_refused_naming_the_key(override, message):
    with pytest.raises(PipelineError) as error:
        validate(composed(override))
    assert message in str(error.value) and "\n" not in str(error.value)

import pytest

from cnnpipe.stages.params_report import to_markdown, to_metrics
from cnnpipe.training.classifier import untrained
from cnnpipe.training.models import ChapterCNN
from cnnpipe.training.param_count import params_report
from tests.helpers import CLASSES


def keras_conv(k, c_in, c_out):
    return (k * k * c_in + 1) * c_out


def keras_dense(n_in, n_out):
    return (n_in + 1) * n_out


@pytest.fixture
def report():
    return params_report(untrained(CLASSES), [[32, 32, 3, 64], [224, 224, 3, 1000]])


def test_chapter_cnn_has_122570_parameters():
    assert sum(p.numel() for p in ChapterCNN().parameters()) == 122_570


def test_layers_match_keras_model_summary(report):
    rows = {r["layer"]: r for r in report["layers"]}
    assert list(rows) == [
        "conv1",
        "pool1",
        "conv2",
        "pool2",
        "conv3",
        "flatten",
        "dense1",
        "dense2",
    ]
    assert rows["conv1"]["params"] == keras_conv(3, 3, 32) == 896
    assert rows["conv2"]["params"] == keras_conv(3, 32, 64)
    assert rows["conv3"]["params"] == keras_conv(3, 64, 64)
    assert rows["dense1"]["params"] == keras_dense(4 * 4 * 64, 64)
    assert rows["dense2"]["params"] == keras_dense(64, 10)
    assert rows["conv1"]["output_shape"] == "(None, 30, 30, 32)"
    assert rows["pool2"]["output_shape"] == "(None, 6, 6, 64)"
    assert rows["flatten"]["output_shape"] == "(None, 1024)"
    assert report["total_params"] == report["trainable_params"] == 122_570


def test_multiply_accumulates_per_layer(report):
    rows = {r["layer"]: r for r in report["layers"]}
    # Output positions x filters x (kernel area x input channels).
    assert rows["conv1"]["macs"] == 30 * 30 * 32 * (3 * 3 * 3)
    assert rows["conv2"]["macs"] == 13 * 13 * 64 * (3 * 3 * 32)
    assert rows["dense1"]["macs"] == 1024 * 64
    assert rows["pool1"]["macs"] == 0
    assert rows["conv3"]["macs"] == 4 * 4 * 64 * (3 * 3 * 64)
    assert rows["dense2"]["macs"] == 64 * 10
    assert report["total_macs"] == 777_600 + 3_115_008 + 589_824 + 65_536 + 640


def test_dense_layer_on_raw_pixels_is_far_larger(report):
    small, chapter = report["dense_baselines"]
    assert small["params"] == 32 * 32 * 3 * 64 + 64
    assert chapter["params"] == 150_529_000
    assert chapter["times_model"] == round(150_529_000 / 122_570, 2)


def test_markdown_and_metrics_carry_the_same_numbers(report):
    md = to_markdown(report, "ChapterCNN")
    assert "| conv2 | Conv2d | (None, 13, 13, 64) | 18,496 |" in md
    assert "**122,570**" in md and "150,529,000" in md
    assert to_metrics(report) == {
        "model.params": 122_570,
        "model.trainable_params": 122_570,
        "model.macs": 4_548_608,
        "model.dense_layer_32x32x3_to_64_params": 196_672,
        "model.dense_layer_32x32x3_to_64_times_model": round(196_672 / 122_570, 2),
        "model.dense_layer_224x224x3_to_1000_params": 150_529_000,
        "model.dense_layer_224x224x3_to_1000_times_model": round(150_529_000 / 122_570, 2),
    }

import json
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from cnnpipe.base.config import baseline_config
from cnnpipe.chapter.measures import equivariance_error, measure, shift
from cnnpipe.chapter.plots import draw
from cnnpipe.chapter.report import report, self_contained_html
from cnnpipe.data.loader import read_split
from cnnpipe.stages.baseline import train_baseline
from cnnpipe.stages.params_report import to_metrics
from cnnpipe.tracking.stage_run import record
from cnnpipe.training.classifier import load_checkpoint
from cnnpipe.training.evaluation import evaluate
from cnnpipe.training.fit import train
from cnnpipe.training.inference import TorchModel, nhwc, predict_probs
from cnnpipe.training.models import ChapterCNN, DenseBaseline
from cnnpipe.training.param_count import params_report
from tests.helpers import composed


def test_shift_moves_content_right_and_down_with_zero_fill():
    x = torch.arange(16.0).view(1, 1, 4, 4) + 1
    y = shift(x, 1)
    assert torch.equal(y[0, 0, 1:, 1:], x[0, 0, :3, :3])
    assert y[0, 0, 0].abs().sum() == 0 and y[0, 0, :, 0].abs().sum() == 0


def test_convolution_is_translation_equivariant_and_a_dense_layer_is_not():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 12, 12)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    # The same output map size, but every output position has its own weights.
    dense = nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 12 * 12, 8 * 12 * 12), nn.Unflatten(1, (8, 12, 12))
    )
    for k in (1, 2, 3):
        assert equivariance_error(conv, x, k, margin=4) < 1e-5
        assert equivariance_error(dense, x, k, margin=4) > 0.5


def test_dense_baseline_has_at_least_the_cnns_parameters():
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(DenseBaseline()) == 201_482 >= count(ChapterCNN()) == 122_570


@pytest.fixture
def pipeline_cfg(tmp_path, data_dir, monkeypatch):
    """A 1-epoch run of train, evaluate, params report and baseline on the tiny data set."""
    monkeypatch.chdir(tmp_path)
    overrides = [f"paths.data={data_dir}", "trainer.max_epochs=1", "data.val_size=40"]
    cfg = composed(*overrides)
    record(cfg.paths.train_metrics, train(cfg))
    record(cfg.paths.eval_metrics, evaluate(cfg))
    report_ = params_report(load_checkpoint(cfg.paths.checkpoint), cfg.report.dense_baselines)
    record(cfg.paths.params_json, to_metrics(report_))
    record(cfg.paths.baseline_metrics, train_baseline(cfg))
    return cfg


def test_every_picture_and_number_is_produced(pipeline_cfg):
    cfg = pipeline_cfg
    baseline = json.loads(Path(cfg.paths.baseline_metrics).read_text())
    assert baseline["baseline.params"] == 201_482
    # The recorded accuracy is the baseline checkpoint's, recomputed here.
    assert baseline["baseline.test_acc"] == evaluate(baseline_config(cfg))["test.acc"]

    module = load_checkpoint(cfg.paths.checkpoint)
    dense = load_checkpoint(baseline_config(cfg).paths.checkpoint)
    images, labels = read_split(cfg, "test")
    numbers = measure(cfg, module, dense, images)
    numbers["chapter.mistakes_shown"] = draw(cfg, module, images, labels)
    errors = [numbers[f"chapter.conv1_equivariance_error_shift{k}"] for k in (1, 2, 3)]
    assert all(e < 1e-4 for e in errors)
    # Each share recomputed: predictions on images moved k pixels (zero fill) against unmoved.
    for net, classifier in (("cnn", module), ("dense", dense)):
        model = TorchModel(classifier)
        before = predict_probs(model, nhwc(images), 64).argmax(1)
        for k in (1, 2, 3):
            moved = torch.zeros_like(images)
            moved[..., k:, k:] = images[..., :-k, :-k]
            after = predict_probs(model, nhwc(moved), 64).argmax(1)
            kept = (after == before).float().mean().item()
            assert numbers[f"chapter.{net}_prediction_kept_shift{k}"] == round(kept, 4)
    # As many mistakes as the deployed model makes, up to chapter.mistakes.
    tta = TorchModel(module, **cfg.evaluate.tta)
    wrong = (predict_probs(tta, nhwc(images), 64).argmax(1) != labels).sum().item()
    assert numbers["chapter.mistakes_shown"] == min(wrong, cfg.chapter.mistakes)

    for key in ("params_png", "curves_png", "filters_png", "feature_maps_png", "mistakes_png"):
        assert Path(cfg.paths[key]).read_bytes()[:4] == b"\x89PNG", key

    md = report(cfg, numbers)
    here = Path(cfg.paths.chapter_report).parent
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 6
    for link in links:
        assert Path(os.path.normpath(here / link)).is_file(), link
    assert "150,529,000" in md and "| Dense (DenseBaseline) | 201,482 |" in md

    # MLflow's artifact view shows no Markdown images: its copy carries the pictures inside.
    html = self_contained_html(md, here)
    assert html.count('src="data:image/png;base64,') == 6 and ".png" not in html

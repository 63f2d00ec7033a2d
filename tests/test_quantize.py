import json
import re

import numpy as np
import onnx
import pytest
import torch

from cnnpipe.artifact.contract import Metadata, input_shape
from cnnpipe.artifact.onnx_export import ArrangedModel
from cnnpipe.artifact.quantization import quantize
from cnnpipe.base.schema import TTA_VIEWS
from cnnpipe.serving.onnx_model import OnnxModel
from cnnpipe.training.classifier import untrained
from cnnpipe.training.inference import TorchModel
from tests.helpers import CLASSES, defaults


@pytest.fixture(scope="module")
def model() -> TorchModel:
    return TorchModel(untrained(CLASSES), TTA_VIEWS)


@pytest.mark.parametrize(
    "views", [TTA_VIEWS, ("image", "mirror_up_left", "mirror_down_right"), ("image",)]
)
def test_rearranged_model_computes_the_torch_models_function(model, views):
    model = TorchModel(model.classifier, views)
    images = torch.randint(0, 256, input_shape(16, (32, 32)), dtype=torch.uint8)
    rearranged = ArrangedModel(model)
    assert rearranged.folded, "ChapterCNN's first convolution has no padding"
    order = [type(m).__name__ for m in rearranged.net.children()][:3]
    assert order == ["Conv2d", "ReLU", "MaxPool2d"]
    with torch.inference_mode():
        assert torch.allclose(rearranged(images), model(images), atol=1e-6)


def test_int8_model_is_quantized_and_agrees_with_fp32(tmp_path, model):
    int8 = tmp_path / "int8.onnx"
    images = np.random.default_rng(0).integers(0, 256, input_shape(128, (32, 32)), dtype=np.uint8)
    metadata = Metadata(CLASSES, model_name="m", tta_views=TTA_VIEWS)
    quantize(model, int8, images[:64], metadata, defaults().export.opset, defaults().parity.atol)

    proto = onnx.load(int8)
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "MaxPool"} <= ops
    weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights, "weights are stored as int8"
    assert max(np.abs(onnx.numpy_helper.to_array(w)).max() for w in weights) <= 64, "7-bit"
    quant = OnnxModel.load(int8)
    assert quant.metadata == metadata
    with torch.inference_mode():
        want = model(torch.from_numpy(images)).numpy()
    got = quant.probabilities(images)
    assert np.abs(got - want).max() < 0.05
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9
    assert [p.name for p in tmp_path.iterdir()] == ["int8.onnx"]


@pytest.mark.slow
def test_stage_drops_an_int8_model_that_is_not_fast_enough_and_says_why(project, capsys):
    from cnnpipe import cli
    from cnnpipe.base.config import compose_params

    repo, tiny = project
    for stage in ("train", "evaluate", "export"):
        cli.main([stage])
    verdicts = {}
    for bar in ("quantize.min_speedup=100", "quantize.min_speedup=0"):
        params = compose_params([*tiny, bar, "quantize.max_accuracy_drop=1"], repo / "conf")
        (repo / "params.yaml").write_text(params)
        capsys.readouterr()
        cli.main(["quantize"])
        metrics = json.loads((repo / "metrics/quantize.json").read_text())
        verdicts[bar] = (
            capsys.readouterr().out.strip().splitlines()[-1],
            metrics["int8.kept"],
            (repo / "models/int8/model.onnx").is_file(),
            (dropped := repo / "models/int8/dropped.txt").is_file() and dropped.read_text() or None,
        )
        speedup = metrics["int8.speedup"]
    line, kept, exists, dropped = verdicts["quantize.min_speedup=100"]
    assert not kept and not exists
    assert line.endswith("x the FP32 images/s, under quantize.min_speedup 100x")
    assert "; dropped: it runs at " in line
    reason = line.split("; dropped: ")[1]
    assert dropped == f"No INT8 model: {reason} (metrics/quantize.json).\n"
    line, kept, exists, dropped = verdicts["quantize.min_speedup=0"]
    assert kept and exists and line.endswith("kept as models/int8/model.onnx")
    assert dropped is None
    the_files_references_are_their_own(repo, metrics)
    # The line rounds the speedup to 2 decimals, the metric to 3: they differ by up to 0.0055.
    shown = re.search(r"([\d.]+)x the FP32 images/s at batch 256", line)
    assert shown and float(shown[1]) == pytest.approx(speedup, abs=0.0055 + 1e-9)


def the_files_references_are_their_own(repo, metrics: dict) -> None:
    """evaluate's drift reference is the checkpoint's answers on the test split, as deployed;
    export carries it; the INT8 file carries its own answers' and its own accuracy."""
    from cnnpipe.base.config import load_params
    from cnnpipe.data import drift
    from cnnpipe.data.loader import read_split
    from cnnpipe.training.classifier import load_checkpoint
    from cnnpipe.training.inference import nhwc, predict_probs

    cfg = load_params()
    images, _ = read_split(cfg, "test")
    model = TorchModel(load_checkpoint(cfg.paths.checkpoint), **cfg.evaluate.tta)
    probs = predict_probs(model, nhwc(images), 1000).numpy()
    want = json.loads(json.dumps(drift.reference(nhwc(images).numpy(), probs)))
    assert json.loads((repo / cfg.paths.drift_reference).read_text()) == want
    assert OnnxModel.load(repo / cfg.paths.onnx).metadata.drift_reference == want
    int8 = OnnxModel.load(repo / "models/int8/model.onnx")
    own = drift.reference(nhwc(images).numpy(), int8.probabilities(nhwc(images).numpy()))
    assert int8.metadata.drift_reference == json.loads(json.dumps(own))
    assert int8.metadata.test_accuracy == metrics["int8.test_acc"]

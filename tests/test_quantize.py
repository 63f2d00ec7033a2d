import json
import re

import numpy as np
import onnx
import pytest
import torch

from cnnpipe.module import Predictor, untrained
from cnnpipe.predict import Classifier
from cnnpipe.quantize import QuantizableModel, quantize

CLASSES = [f"c{i}" for i in range(10)]


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(untrained(CLASSES), flip=True, shift=1)


@pytest.mark.parametrize("flip, shift", [(True, 1), (True, 0), (False, 0)])
def test_rearranged_model_computes_the_predictors_function(predictor, flip, shift):
    predictor = Predictor(predictor.classifier, flip, shift)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    rearranged = QuantizableModel(predictor)
    assert rearranged.folded, "ChapterCNN's first convolution has no padding"
    order = [type(m).__name__ for m in rearranged.net.children()][:3]
    assert order == ["Conv2d", "ReLU", "MaxPool2d"]
    with torch.inference_mode():
        assert torch.allclose(rearranged(images), predictor(images), atol=1e-6)


def test_int8_model_is_quantized_and_agrees_with_fp32(tmp_path, predictor):
    int8 = tmp_path / "int8.onnx"
    images = np.random.default_rng(0).integers(0, 256, (128, 32, 32, 3), dtype=np.uint8)
    metadata = {"class_names": json.dumps(CLASSES), "model_name": "m"}
    quantize(predictor, int8, images[:64], metadata)

    model = onnx.load(int8)
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "MaxPool"} <= ops
    weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights, "weights are stored as int8"
    assert max(np.abs(onnx.numpy_helper.to_array(w)).max() for w in weights) <= 64, "7-bit"
    quant = Classifier.load(int8)
    assert quant.session.get_modelmeta().custom_metadata_map == metadata
    with torch.inference_mode():
        want = predictor(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    got = quant.probabilities(images)
    assert np.abs(got - want).max() < 0.05
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9
    assert [p.name for p in tmp_path.iterdir()] == ["int8.onnx"]


@pytest.mark.slow
def test_stage_drops_an_int8_model_that_is_not_fast_enough_and_says_why(project, capsys):
    from cnnpipe import cli
    from cnnpipe.config import compose_params

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
            metrics["int8/kept"],
            (repo / "models/int8/model.onnx").is_file(),
        )
        speedup = metrics["int8/speedup"]
    line, kept, exists = verdicts["quantize.min_speedup=100"]
    assert not kept and not exists
    assert line.endswith("x the FP32 images/s, under quantize.min_speedup 100x")
    assert "; dropped: it runs at " in line
    line, kept, exists = verdicts["quantize.min_speedup=0"]
    assert kept and exists and line.endswith("kept as models/int8/model.onnx")
    # The line rounds the speedup to 2 decimals, the metric to 3: they differ by up to 0.0055.
    shown = re.search(r"([\d.]+)x the FP32 images/s at batch 256", line)
    assert shown and float(shown[1]) == pytest.approx(speedup, abs=0.0055 + 1e-9)

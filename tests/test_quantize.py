import numpy as np
import onnx

from cnnpipe.predict import Classifier
from cnnpipe.quantize import quantize
from conftest import export_random_model

CLASSES = [f"c{i}" for i in range(10)]


def test_int8_model_is_quantized_and_agrees_with_fp32(tmp_path):
    fp32, int8 = tmp_path / "model.onnx", tmp_path / "int8.onnx"
    export_random_model(fp32, CLASSES)
    images = np.random.default_rng(0).integers(0, 256, (128, 32, 32, 3), dtype=np.uint8)
    quantize(fp32, int8, images[:64])

    ops = {node.op_type for node in onnx.load(int8).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = [t for t in onnx.load(int8).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights, "weights are stored as int8"
    a = Classifier.load(fp32).probabilities(images)
    b = Classifier.load(int8).probabilities(images)
    assert Classifier.load(int8).class_names == CLASSES
    assert np.abs(a - b).max() < 0.05
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9
    assert not list(tmp_path.glob(".*partial*"))

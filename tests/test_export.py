import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cnnpipe.artifact.contract import INPUT_NAME, OUTPUT_NAME, Metadata, input_shape
from cnnpipe.artifact.onnx_export import export_onnx
from cnnpipe.base.schema import TTA_VIEWS
from cnnpipe.serving.onnx_model import OnnxModel
from cnnpipe.stages.parity import compare
from cnnpipe.training.classifier import load_checkpoint, untrained
from cnnpipe.training.inference import TorchModel, describe_tta, nhwc, predict_probs
from tests.helpers import CLASSES, ROOT, defaults


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    """The contract's input: (n, 32, 32, 3) uint8."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, input_shape(n, (32, 32)), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module", params=[("image",), TTA_VIEWS], ids=["plain", "six_views"])
def exported(request, tmp_path_factory):
    model = TorchModel(untrained(CLASSES, seed=0), request.param)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    metadata = Metadata(CLASSES, mlflow_run_id="abc", git_commit="123")
    export_onnx(model, path, metadata, defaults().export.opset, defaults().parity.atol, [1, 5])
    return model, path


def test_graph_takes_uint8_nhwc_with_a_dynamic_batch(exported):
    _, path = exported
    model = onnx.load(path)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == INPUT_NAME and out.name == OUTPUT_NAME
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert (
        dims[0].dim_param and tuple(d.dim_value for d in dims[1:]) == input_shape("N", (32, 32))[1:]
    )
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == (
        defaults().export.opset
    )


def test_file_is_self_contained_with_metadata(exported):
    _, path = exported
    model = onnx.load(path, load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert [f.name for f in path.parent.iterdir()] == ["model.onnx"]
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["class_names"]) == CLASSES
    assert props["mlflow_run_id"] == "abc" and props["git_commit"] == "123"
    assert Metadata.from_props(props) == Metadata(CLASSES, mlflow_run_id="abc", git_commit="123")


@pytest.mark.parametrize(
    "flip, shift, views",
    [
        ("true", "1", TTA_VIEWS),
        ("true", "0", ("image", "mirror")),
        ("false", "0", ("image",)),
    ],
)
def test_files_from_before_named_views_read_as_the_views_they_compute(flip, shift, views):
    props = {"class_names": json.dumps(CLASSES), "tta_flip": flip, "tta_shift": shift}
    # The same views; the order differs (the mean does not depend on it).
    assert sorted(Metadata.from_props(props).tta_views) == sorted(views)


@pytest.mark.parametrize("batch", [1, 64])
def test_onnx_matches_pytorch_on_random_weights(exported, batch):
    model, path = exported
    result = compare(model, OnnxModel.load(path), random_images(batch, batch), batch_size=batch)
    assert result["max_abs_diff"] <= defaults().parity.atol
    assert result["top1_agreement"] == 1.0


def test_output_is_probabilities(exported):
    _, path = exported
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (probs,) = session.run(None, {INPUT_NAME: random_images(3).numpy()})
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)


def test_mirror_tta_makes_predictions_mirror_invariant():
    module = untrained(CLASSES, seed=1)
    images = random_images(8)
    tta, plain = TorchModel(module, ["image", "mirror"]), TorchModel(module)
    mirrored = images.flip(2)  # (N, H, W, C): the width axis
    torch.testing.assert_close(predict_probs(tta, images, 8), predict_probs(tta, mirrored, 8))
    assert not torch.allclose(predict_probs(plain, images, 8), predict_probs(plain, mirrored, 8))


def moved_by_hand(images: torch.Tensor, shift: int) -> dict[str, torch.Tensor]:
    """Each view of (N, C, H, W) `images` by its name, built pixel by pixel."""
    views = {}
    for name, image in (("image", images), ("mirror", images.flip(3))):
        down_right, up_left = torch.zeros_like(image), torch.zeros_like(image)
        down_right[:, :, shift:, shift:] = image[:, :, :-shift, :-shift]
        up_left[:, :, :-shift, :-shift] = image[:, :, shift:, shift:]
        views |= {name: image, f"{name}_down_right": down_right, f"{name}_up_left": up_left}
    return views


@pytest.mark.parametrize(
    "views, shift",
    [(TTA_VIEWS, 1), (("image", "mirror_up_left", "mirror_down_right"), 2), (("mirror",), 1)],
)
def test_tta_averages_the_named_views_computed_by_hand(views, shift):
    module = untrained(CLASSES, seed=1).eval()
    images = random_images(4).permute(0, 3, 1, 2)
    by_hand = moved_by_hand(images, shift)
    with torch.inference_mode():
        expected = torch.stack([module(by_hand[v]).softmax(1) for v in views]).mean(0)
        got = TorchModel(module, views, shift)(nhwc(images))
    torch.testing.assert_close(got, expected)


def test_parity_notices_a_different_model(exported):
    model, path = exported
    other = TorchModel(untrained(CLASSES, seed=2), model.views, model.shift)
    assert compare(other, OnnxModel.load(path), random_images(32), 32)["max_abs_diff"] > 1e-5


@pytest.mark.parametrize(
    "target", ["cnnpipe.training.models.ChapterCNNBatchNorm", "cnnpipe.training.models.ResNet9"]
)
def test_other_models_export_with_parity(tmp_path, target):
    module = untrained(CLASSES, target, seed=3)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    model = TorchModel(module, TTA_VIEWS)
    opset, atol = defaults().export.opset, defaults().parity.atol
    export_onnx(model, tmp_path / "m.onnx", Metadata(CLASSES), opset, atol, [1, 3])
    result = compare(model, OnnxModel.load(tmp_path / "m.onnx"), random_images(16), 16)
    assert result["max_abs_diff"] <= atol and result["top1_agreement"] == 1.0


@pytest.mark.parametrize(
    "views, words",
    [
        (["image"], "no test-time augmentation"),
        (["mirror"], "1 test-time view (mirror)"),
        (
            ["image", "mirror_up_left", "mirror_down_right"],
            "3 test-time views (image, mirror up-left, mirror down-right; moved by 2 px)",
        ),
    ],
)
def test_views_are_described_as_the_registry_and_bench_show_them(views, words):
    assert describe_tta(views, 2) == words


def test_a_checkpoint_from_before_the_packages_loads_exports_and_serves(tmp_path):
    """tests/fixtures/chapter_cnn_flat_layout.ckpt: a train stage's checkpoint (tiny data, one
    epoch) saved when the networks lived in cnnpipe.models."""
    path = ROOT / "tests/fixtures/chapter_cnn_flat_layout.ckpt"
    saved = torch.load(path, weights_only=True)
    assert saved["hyper_parameters"]["net"]["_target_"] == "cnnpipe.models.ChapterCNN"
    module = load_checkpoint(str(path))
    for name, tensor in module.net.state_dict().items():
        assert torch.equal(tensor, saved["state_dict"][f"net.{name}"]), name
    model = TorchModel(module, ("image", "mirror"))
    metadata = Metadata(module.hparams.class_names, mlflow_run_id="abc", git_commit="123")
    onnx_file = tmp_path / "model.onnx"
    export_onnx(model, onnx_file, metadata, defaults().export.opset, defaults().parity.atol, [1])
    result = compare(model, OnnxModel.load(onnx_file), random_images(16), 16)
    assert result["max_abs_diff"] <= defaults().parity.atol and result["top1_agreement"] == 1

"""Stage `parity`: the ONNX model in onnxruntime against the PyTorch checkpoint, on the test set;
a model that passes is registered as a new version (the `promote` stage decides its alias)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig

from cnnpipe import PipelineError
from cnnpipe.artifact import contract
from cnnpipe.base.args import Parser
from cnnpipe.base.config import load_params, network_name, registered_name

if TYPE_CHECKING:
    import torch

    from cnnpipe.serving.onnx_model import OnnxModel
    from cnnpipe.training.inference import TorchModel


def compare(
    model: TorchModel,
    onnx_model: OnnxModel,
    images: torch.Tensor,
    batch_size: int,
    labels: torch.Tensor | None = None,
) -> dict:
    """Largest probability difference and top-1 agreement between PyTorch and onnxruntime on
    (N, H, W, 3) `images`, and with `labels`, the accuracy of the ONNX file itself: the accuracy
    of what gets deployed."""
    from cnnpipe.training.inference import predict_probs

    want = predict_probs(model, images, batch_size).numpy()
    got = onnx_model.probabilities(images.numpy(), batch_size)
    result = {
        "max_abs_diff": float(np.abs(got - want).max()),
        "top1_agreement": float((got.argmax(1) == want.argmax(1)).mean()),
        "images": len(images),
    }
    if labels is not None:
        result["onnx_test_acc"] = float((got.argmax(1) == labels.numpy()).mean())
    return result


def version_description(
    cfg: DictConfig, result: dict, params: int, size: tuple[int, int], link: str
) -> str:
    """What a registered version holds and how it was checked, for the registry's page."""
    from cnnpipe.training.inference import describe_tta

    return (
        f"{network_name(cfg.model)} ({params:,} parameters) as ONNX: "
        f"{contract.input_description(size)} in, class probabilities out, preprocessing and "
        f"{describe_tta(**cfg.evaluate.tta)} inside.\n\n"
        f"- Test accuracy as deployed (this file in onnxruntime): "
        f"**{result['onnx_test_acc']:.2%}** on {result['images']:,} test images\n"
        f"- Parity with PyTorch: max |diff| {result['max_abs_diff']:.2e}, top-1 agreement "
        f"{result['top1_agreement']:.2%}\n"
        f"- [The pipeline run that made it]({link})"
    )


def main(argv: list[str] | None = None) -> None:
    Parser(prog="cnnpipe parity", description=__doc__).parse_args(argv)
    cfg: DictConfig = load_params()
    from cnnpipe.data.loader import read_split
    from cnnpipe.serving.onnx_model import OnnxModel
    from cnnpipe.tracking.datasets import scored_dataset
    from cnnpipe.tracking.registry import log_onnx_model
    from cnnpipe.tracking.stage_run import record, stage_run
    from cnnpipe.tracking.store import ui_link
    from cnnpipe.training.classifier import load_checkpoint
    from cnnpipe.training.inference import TorchModel, nhwc

    with stage_run(cfg, "parity") as run:
        module = load_checkpoint(cfg.paths.checkpoint)
        model = TorchModel(module, **cfg.evaluate.tta)
        onnx_model = OnnxModel.load(cfg.paths.onnx)
        images, labels = read_split(cfg, "test")
        images = nhwc(images)
        result = compare(model, onnx_model, images, cfg.parity.batch_size, labels)
        if result["max_abs_diff"] > cfg.parity.atol or result["top1_agreement"] < 1:
            raise PipelineError(
                f"ONNX and PyTorch disagree: max |diff| {result['max_abs_diff']:.2e} (parity.atol "
                f"{cfg.parity.atol:.0e}), top-1 agreement {result['top1_agreement']:.4%}"
            )

        # Only a model that passed parity is logged with the ONNX flavour and registered.
        example = images[:4].numpy()
        params = sum(p.numel() for p in module.net.parameters())
        link = ui_link(run.info.experiment_id, run.info.run_id)
        version = log_onnx_model(
            Path(cfg.paths.onnx),
            f"{network_name(cfg.model)}-onnx",
            registered_name(cfg),
            version_description(cfg, result, params, model.size, link),
            (example, onnx_model.probabilities(example)),
            {
                "test.acc": result["onnx_test_acc"],
                "parity.max_abs_diff": result["max_abs_diff"],
                "parity.top1_agreement": result["top1_agreement"],
            },
            scored_dataset(cfg),
        )
        # With the version it registered: a new version changes the file, so DVC reruns the
        # promote stage that gates it. The registry's aliases are promote's alone.
        figures = {f"parity.{k}": v for k, v in result.items()}
        record(cfg.paths.parity_metrics, {**figures, "parity.version": version})
    print(f"registered {registered_name(cfg)} version {version}")
    print(
        f"parity: max |diff| {result['max_abs_diff']:.2e}, "
        f"top-1 agreement {result['top1_agreement']:.4%} on {result['images']} images"
    )

"""Stage `quantize`: an INT8 copy of the ONNX model, kept only if it loses at most a set accuracy
and is faster than the FP32 model by a set margin (cnnpipe.artifact.quantization)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig

from cnnpipe.base.args import Parser
from cnnpipe.base.config import load_params, network_name, registered_name
from cnnpipe.base.files import atomic_folder

if TYPE_CHECKING:
    from cnnpipe.artifact.quantization import Probabilities
    from cnnpipe.serving.onnx_model import OnnxModel

# What the output folder holds instead of model.onnx when the INT8 model is dropped.
DROPPED = "dropped.txt"


def main(argv: list[str] | None = None) -> None:
    Parser(prog="cnnpipe quantize", description=__doc__).parse_args(argv)
    cfg: DictConfig = load_params()
    from cnnpipe.data.loader import read_split
    from cnnpipe.tracking.stage_run import record, stage_run
    from cnnpipe.tracking.store import ui_link
    from cnnpipe.training.inference import nhwc

    with stage_run(cfg, "quantize") as run:
        test_images, test_labels = read_split(cfg, "test")
        images, labels = nhwc(test_images).numpy(), test_labels.numpy()
        # Built beside the output and swapped in at the end: a failure keeps the previous one.
        with atomic_folder(cfg.paths.int8) as folder:
            int8 = folder / "model.onnx"
            metrics, why_not, quant = build(cfg, int8, images, labels)
            if why_not:
                int8.unlink()
                # Said in the folder too: DVC would otherwise warn that the output is empty.
                (folder / DROPPED).write_text(
                    f"No INT8 model: {' and '.join(why_not)} (metrics/quantize.json).\n"
                )
            record(cfg.paths.quantize_metrics, metrics)
            if not why_not:
                link = ui_link(run.info.experiment_id, run.info.run_id)
                register(cfg, int8, quant.probabilities, images[:4], metrics, link)
    verdict = (
        f"kept as {cfg.paths.int8}/model.onnx"
        if not why_not
        else "dropped: " + " and ".join(why_not)
    )
    print(
        f"INT8 test.acc {metrics['int8.test_acc']:.4f} vs FP32 "
        f"{metrics['int8.test_acc'] + metrics['int8.accuracy_drop']:.4f}, "
        f"{metrics['int8.speedup']:.2f}x the FP32 images/s at batch {cfg.quantize.batch_size}; "
        f"{verdict}"
    )


def build(
    cfg: DictConfig, int8: Path, images: np.ndarray, labels: np.ndarray
) -> tuple[dict, list[str], OnnxModel]:
    """The INT8 model at `int8`, compared with the FP32 one on the test `images`: the metrics,
    why it is not worth keeping (nothing if it is), and the model, which describes itself."""
    from cnnpipe.artifact.quantization import (
        calibration_images,
        compare,
        describe_itself,
        quantize,
        reasons_to_drop,
    )
    from cnnpipe.serving.onnx_model import OnnxModel
    from cnnpipe.training.classifier import load_checkpoint
    from cnnpipe.training.inference import TorchModel

    fp32 = OnnxModel.load(cfg.paths.onnx)
    model = TorchModel(load_checkpoint(cfg.paths.checkpoint), **cfg.evaluate.tta)
    calibration = calibration_images(cfg)
    quantize(model, int8, calibration, fp32.metadata, cfg.export.opset, cfg.parity.atol)
    quant = OnnxModel.load(int8)
    metrics = compare(
        fp32.probabilities, quant.probabilities, images, labels, cfg.quantize.batch_size
    )
    why_not = reasons_to_drop(metrics, cfg.quantize)
    metrics["int8.kept"] = not why_not
    if not why_not:
        acc = metrics["int8.test_acc"]
        describe_itself(int8, fp32.metadata, images, quant.probabilities, acc)
        quant = OnnxModel.load(int8)
    return metrics, why_not, quant


def register(
    cfg: DictConfig, int8: Path, model: Probabilities, example: np.ndarray, metrics: dict, link: str
) -> None:
    """Log the kept INT8 model with the ONNX flavour and register it as `<model name>-int8`."""
    from cnnpipe.artifact.quantization import description
    from cnnpipe.tracking.datasets import scored_dataset
    from cnnpipe.tracking.registry import log_onnx_model

    log_onnx_model(
        int8,
        f"{network_name(cfg.model)}-onnx-int8",
        f"{registered_name(cfg)}-int8",
        description(cfg, metrics, link),
        (example, model(example)),
        {k: metrics[k] for k in ("int8.test_acc", "int8.accuracy_drop", "int8.speedup")},
        scored_dataset(cfg),
    )

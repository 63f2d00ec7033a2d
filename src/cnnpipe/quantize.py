"""Stage `quantize`: an INT8 copy of the ONNX model, kept only if it loses at most a set accuracy.

onnxruntime's static quantization (QDQ format, per-channel weights), calibrated on training images.
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import onnx
import torch
from omegaconf import DictConfig
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from cnnpipe import tracking
from cnnpipe.config import load_params
from cnnpipe.data import read_split
from cnnpipe.files import atomic_path
from cnnpipe.predict import Classifier


class ImageBatches(CalibrationDataReader):
    """Feeds NHWC uint8 batches to the calibrator."""

    def __init__(self, images: np.ndarray, input_name: str, batch_size: int) -> None:
        self.batches = iter(
            [{input_name: images[i : i + batch_size]} for i in range(0, len(images), batch_size)]
        )

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def quantize(fp32: Path, int8: Path, calibration: np.ndarray, batch_size: int = 64) -> None:
    """Write the INT8 model for the FP32 model at `fp32` to `int8`."""
    input_name = Classifier.load(fp32).input_name
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(fp32, prepared)  # shape inference and graph clean-up, as ORT recommends
        with atomic_path(int8) as out:
            quantize_static(
                prepared,
                out,
                ImageBatches(calibration, input_name, batch_size),
                quant_format=QuantFormat.QDQ,
                # Only the matrix work: quantizing the element-wise ops around it (scaling,
                # pooling, flip, softmax) halved throughput here at no gain in accuracy.
                op_types_to_quantize=["Conv", "Gemm", "MatMul"],
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )


def accuracy_and_speed(model: Path, images: np.ndarray, labels: np.ndarray, batch: int) -> dict:
    classifier = Classifier.load(model)
    classifier.probabilities(images[:batch], batch)  # warm up
    start = time.perf_counter()
    probs = classifier.probabilities(images, batch)
    seconds = time.perf_counter() - start
    return {
        "test_acc": float((probs.argmax(1) == labels).mean()),
        "images_per_second": round(len(images) / seconds, 1),
    }


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="cnnpipe quantize", description=__doc__).parse_args(argv)
    cfg: DictConfig = load_params()
    q = cfg.quantize
    with tracking.stage_run(cfg, "quantize") as run:
        train_images, _ = read_split(Path(cfg.paths.data), "train")
        pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(cfg.seed))
        calibration = train_images[pick[: q.calibration_images]].permute(0, 2, 3, 1).contiguous()
        test_images, test_labels = read_split(Path(cfg.paths.data), "test")
        test_nhwc = test_images.permute(0, 2, 3, 1).contiguous().numpy()

        out_dir = Path(cfg.paths.int8)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        # Built beside the output and swapped in at the end: a failure keeps the previous one.
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".int8-"))
        try:
            int8 = tmp / "model.onnx"
            quantize(Path(cfg.paths.onnx), int8, calibration.numpy())
            labels = test_labels.numpy()
            fp32 = accuracy_and_speed(Path(cfg.paths.onnx), test_nhwc, labels, q.batch_size)
            quant = accuracy_and_speed(int8, test_nhwc, labels, q.batch_size)
            drop = fp32["test_acc"] - quant["test_acc"]
            kept = drop <= q.max_accuracy_drop
            if not kept:
                int8.unlink()
            metrics = {
                "int8/test_acc": quant["test_acc"],
                "int8/accuracy_drop": round(drop, 6),
                "int8/images_per_second": quant["images_per_second"],
                "int8/fp32_images_per_second": fp32["images_per_second"],
                "int8/speedup": round(quant["images_per_second"] / fp32["images_per_second"], 3),
                "int8/kept": kept,
            }
            tracking.record(cfg.paths.quantize_metrics, metrics)
            if kept:
                register(cfg, int8, metrics, run)
            shutil.rmtree(out_dir, ignore_errors=True)
            tmp.rename(out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    verdict = (
        f"kept as {out_dir / 'model.onnx'}"
        if kept
        else f"dropped: loses more than {q.max_accuracy_drop:.1%}"
    )
    print(
        f"INT8 test/acc {quant['test_acc']:.4f} vs FP32 {fp32['test_acc']:.4f}, "
        f"{metrics['int8/speedup']:.2f}x images/s at batch {q.batch_size}; {verdict}"
    )


def register(cfg: DictConfig, int8: Path, metrics: dict, run: mlflow.ActiveRun) -> None:
    """Log the kept INT8 model with the ONNX flavour and register it as `<model_name>-int8`, so
    `models:/<model_name>-int8/<version>` serves it."""
    network = cfg.model._target_.rsplit(".", 1)[-1]
    name = f"{cfg.mlflow.model_name}-int8"
    info = mlflow.onnx.log_model(
        onnx.load(int8),
        name=f"{network}-onnx-int8",
        registered_model_name=name,
        save_as_external_data=False,
        onnx_execution_providers=["CPUExecutionProvider"],
    )
    link = tracking.run_link(run.info.experiment_id, run.info.run_id)
    mlflow.MlflowClient().update_model_version(
        name,
        info.registered_model_version,
        f"{network} quantized to INT8 (onnxruntime static QDQ, per-channel weights), same "
        f"input and output as `{cfg.mlflow.model_name}`.\n\n"
        f"- Test accuracy as deployed: **{metrics['int8/test_acc']:.2%}** "
        f"({metrics['int8/accuracy_drop'] * 100:.2f} points below FP32)\n"
        f"- Images/s against FP32 at batch {cfg.quantize.batch_size}: "
        f"{metrics['int8/speedup']:.2f}x\n"
        f"- [The pipeline run that made it]({link})",
    )

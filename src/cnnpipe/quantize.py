"""Stage `quantize`: an INT8 copy of the ONNX model, kept only if it loses at most a set accuracy.

onnxruntime's static quantization (QDQ format, per-channel weights), calibrated on training images.
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
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
    train_images, _ = read_split(Path(cfg.paths.data), "train")
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(cfg.seed))
    calibration = train_images[pick[: q.calibration_images]].permute(0, 2, 3, 1).contiguous()
    test_images, test_labels = read_split(Path(cfg.paths.data), "test")
    test_nhwc = test_images.permute(0, 2, 3, 1).contiguous().numpy()

    out_dir = Path(cfg.paths.int8)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    int8 = out_dir / "model.onnx"
    quantize(Path(cfg.paths.onnx), int8, calibration.numpy())
    fp32 = accuracy_and_speed(Path(cfg.paths.onnx), test_nhwc, test_labels.numpy(), q.batch_size)
    quant = accuracy_and_speed(int8, test_nhwc, test_labels.numpy(), q.batch_size)
    drop = fp32["test_acc"] - quant["test_acc"]
    kept = drop <= q.max_accuracy_drop
    if not kept:
        int8.unlink()
    metrics = {
        "fp32": fp32,
        "int8": quant,
        "accuracy_drop": round(drop, 6),
        "speedup": round(quant["images_per_second"] / fp32["images_per_second"], 3),
        "kept": kept,
    }
    with atomic_path(cfg.paths.quantize_metrics) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    with tracking.pipeline_run(cfg, Path(cfg.paths.run)):
        mlflow.log_metrics(
            {
                "int8/test_acc": quant["test_acc"],
                "int8/accuracy_drop": drop,
                "int8/speedup": metrics["speedup"],
            }
        )
        if kept:
            mlflow.log_artifact(str(int8), "int8")
    verdict = f"kept as {int8}" if kept else f"dropped: loses more than {q.max_accuracy_drop:.1%}"
    print(
        f"INT8 test/acc {quant['test_acc']:.4f} vs FP32 {fp32['test_acc']:.4f}, "
        f"{metrics['speedup']:.2f}x images/s at batch {q.batch_size}; {verdict}"
    )

"""INT8 quantization of the deployed model: onnxruntime's static quantization (QDQ format,
per-channel weights), calibrated on training images, of the graph export writes (the
TorchModel's function arranged for onnxruntime: cnnpipe.artifact.onnx_export.ArrangedModel);
and how it compares with the FP32 model."""

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

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

from cnnpipe.artifact import contract
from cnnpipe.artifact.onnx_export import export_onnx
from cnnpipe.base.config import network_name, registered_name
from cnnpipe.base.files import atomic_path
from cnnpipe.data import drift
from cnnpipe.data.loader import read_split
from cnnpipe.training.inference import TorchModel, nhwc

# A model as the stage runs it: NHWC uint8 images in, probabilities out (OnnxModel.probabilities).
Probabilities = Callable[[np.ndarray], np.ndarray]


class ImageBatches(CalibrationDataReader):
    """Feeds NHWC uint8 batches to the calibrator."""

    def __init__(self, images: np.ndarray, input_name: str, batch_size: int) -> None:
        self.batches = iter(
            [{input_name: images[i : i + batch_size]} for i in range(0, len(images), batch_size)]
        )

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def quantize(
    model: TorchModel,
    int8: Path,
    calibration: np.ndarray,
    metadata: contract.Metadata,
    opset: int,
    atol: float,
    batch_size: int = 64,
) -> None:
    """Write an INT8 model of `model` to `int8`, calibrated on the contract's uint8 images; the
    rearranged FP32 graph is checked against PyTorch within `atol` first."""
    with tempfile.TemporaryDirectory() as tmp:
        fp32, prepared = Path(tmp) / "fp32.onnx", Path(tmp) / "prepared.onnx"
        # export_onnx checks the rearranged graph against PyTorch before it is quantized.
        export_onnx(model, fp32, metadata, opset, atol, [1])
        quant_pre_process(fp32, prepared)  # shape inference and graph clean-up, as ORT recommends
        with atomic_path(int8) as out:
            quantize_static(
                prepared,
                out,
                ImageBatches(calibration, contract.INPUT_NAME, batch_size),
                quant_format=QuantFormat.QDQ,
                # Softmax and the views' average stay FP32; quantizing them cost accuracy and time.
                op_types_to_quantize=["Conv", "Gemm", "MatMul", "MaxPool", "Relu"],
                per_channel=True,
                # 7-bit weights: without AVX-512 VNNI, onnxruntime multiplies uint8 by int8 with
                # an instruction whose int16 sums saturate; full-range weights lost 9 points.
                reduce_range=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
            proto = onnx.load(out)
            onnx.helper.set_model_props(proto, metadata.to_props(model.size))
            onnx.save(proto, out)


def describe_itself(
    int8: Path, metadata: contract.Metadata, images: np.ndarray, model: Probabilities, acc: float
) -> None:
    """Give the INT8 file, written with the FP32 model's metadata, its own test accuracy `acc`
    and drift reference: its predictions on the test `images` are not the FP32 model's."""
    reference = drift.reference(images, model(images))
    own = replace(metadata, test_accuracy=acc, drift_reference=reference)
    proto = onnx.load(int8)
    onnx.helper.set_model_props(proto, own.to_props(images.shape[1:3]))
    with atomic_path(int8) as out:
        onnx.save(proto, out)


def images_per_second(
    runs: dict[str, Probabilities], batch: np.ndarray, rounds: int = 7
) -> dict[str, float]:
    """Median images/s of each run over `rounds` taken in turn: this VM's speed drifts by tens of
    percent within a minute, so runs measured one after the other are not comparable."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run(batch)  # warm up
    for _ in range(rounds):
        for name, run in runs.items():
            # onnxruntime's idle threads spin for a while after a run, taking the cores from the
            # next model measured: a pause lets them sleep first.
            time.sleep(0.1)
            start = time.perf_counter()
            for _ in range(4):
                run(batch)
            samples[name].append(4 * len(batch) / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


def accuracy(model: Probabilities, images: np.ndarray, labels: np.ndarray) -> float:
    return float((model(images).argmax(1) == labels).mean())


def calibration_images(cfg: DictConfig) -> np.ndarray:
    """`quantize.calibration_images` training images drawn by `seed`, NHWC uint8."""
    train_images, _ = read_split(cfg, "train")
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(cfg.seed))
    return nhwc(train_images[pick[: cfg.quantize.calibration_images]]).numpy()


def compare(
    fp32: Probabilities,
    int8: Probabilities,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
) -> dict:
    """The INT8 model's test accuracy and speed against the FP32 model's, measured side by side
    on `images` (NHWC uint8), the speed at `batch_size`."""
    fp32_acc, int8_acc = accuracy(fp32, images, labels), accuracy(int8, images, labels)
    speed = images_per_second({"fp32": fp32, "int8": int8}, images[:batch_size])
    return {
        "int8.test_acc": int8_acc,
        "int8.accuracy_drop": round(fp32_acc - int8_acc, 6),
        "int8.images_per_second": round(speed["int8"], 1),
        "int8.fp32_images_per_second": round(speed["fp32"], 1),
        "int8.speedup": round(speed["int8"] / speed["fp32"], 3),
    }


def reasons_to_drop(metrics: dict, q: DictConfig) -> list[str]:
    """Why the INT8 model is not worth keeping under `q` (conf's quantize node): none if it is."""
    drop, speedup = metrics["int8.accuracy_drop"], metrics["int8.speedup"]
    reasons = []
    if drop > q.max_accuracy_drop:
        reasons.append(
            f"it loses {drop:.2%} of test accuracy, more than quantize.max_accuracy_drop "
            f"{q.max_accuracy_drop:.2%}"
        )
    if speedup < q.min_speedup:
        reasons.append(
            f"it runs at {speedup:.2f}x the FP32 images/s, under quantize.min_speedup "
            f"{q.min_speedup:g}x"
        )
    return reasons


def description(cfg: DictConfig, metrics: dict, link: str) -> str:
    """What a registered INT8 version is and how it compares, for the registry's page."""
    return (
        f"{network_name(cfg.model)} quantized to INT8 (onnxruntime static QDQ, per-channel 7-bit "
        f"weights), same input and output as `{registered_name(cfg)}`.\n\n"
        f"- Test accuracy as deployed: **{metrics['int8.test_acc']:.2%}** "
        f"({metrics['int8.accuracy_drop'] * 100:.2f} points below FP32)\n"
        f"- Images/s against FP32 at batch {cfg.quantize.batch_size}: "
        f"{metrics['int8.speedup']:.2f}x\n"
        f"- [The pipeline run that made it]({link})"
    )

"""Stage `parity`: the ONNX model in onnxruntime against the PyTorch checkpoint, on the test set."""

import argparse
import json
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import torch
from mlflow.models import infer_signature
from omegaconf import DictConfig

from cnnpipe import PipelineError, tracking
from cnnpipe.config import load_params
from cnnpipe.data import read_split
from cnnpipe.export import INPUT_NAME
from cnnpipe.files import atomic_path
from cnnpipe.module import Predictor, load_checkpoint, predict_probs


def onnx_probs(path: Path, images_nhwc: np.ndarray, batch_size: int) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return np.concatenate(
        [
            session.run(None, {INPUT_NAME: images_nhwc[i : i + batch_size]})[0]
            for i in range(0, len(images_nhwc), batch_size)
        ]
    )


def compare(predictor: Predictor, onnx_path: Path, images: torch.Tensor, batch_size: int) -> dict:
    """Largest probability difference and top-1 agreement between PyTorch and onnxruntime."""
    want = predict_probs(predictor, images, batch_size).numpy()
    got = onnx_probs(onnx_path, images.permute(0, 2, 3, 1).contiguous().numpy(), batch_size)
    return {
        "max_abs_diff": float(np.abs(got - want).max()),
        "top1_agreement": float((got.argmax(1) == want.argmax(1)).mean()),
        "images": len(images),
    }


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="cnnpipe parity", description=__doc__).parse_args(argv)
    cfg: DictConfig = load_params()
    predictor = Predictor(load_checkpoint(cfg.paths.checkpoint), cfg.evaluate.tta_flip)
    onnx_path = Path(cfg.paths.onnx)
    images, _ = read_split(Path(cfg.paths.data), "test")
    result = compare(predictor, onnx_path, images, cfg.parity.batch_size)
    if result["max_abs_diff"] > cfg.parity.atol or result["top1_agreement"] < 1:
        raise PipelineError(
            f"ONNX and PyTorch disagree: max |diff| {result['max_abs_diff']:.2e} "
            f"(parity.atol {cfg.parity.atol:.0e}), top-1 agreement {result['top1_agreement']:.4%}"
        )
    with atomic_path(cfg.paths.parity_metrics) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")

    # Only a model that passed parity is logged with the ONNX flavour and registered.
    example = images[:4].permute(0, 2, 3, 1).contiguous().numpy()
    signature = infer_signature(example, onnx_probs(onnx_path, example, len(example)))
    with tracking.pipeline_run(cfg, Path(cfg.paths.run)):
        mlflow.log_metrics({f"parity/{k}": v for k, v in result.items()})
        mlflow.onnx.log_model(
            onnx.load(onnx_path),
            name="model",
            registered_model_name=cfg.mlflow.model_name,
            signature=signature,
            input_example=example,
            save_as_external_data=False,
            onnx_execution_providers=["CPUExecutionProvider"],
        )
    print(
        f"parity: max |diff| {result['max_abs_diff']:.2e}, "
        f"top-1 agreement {result['top1_agreement']:.4%} on {result['images']} images"
    )

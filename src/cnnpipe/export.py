"""Stage `export`: an ONNX file that takes decoded images and returns class probabilities."""

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from omegaconf import DictConfig
from torch import nn

from cnnpipe import PipelineError, tracking
from cnnpipe.config import load_params
from cnnpipe.files import atomic_path
from cnnpipe.module import Predictor, load_checkpoint

INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
INPUT_DESCRIPTION = "uint8 RGB images as decoded, shape (N, 32, 32, 3), values 0-255"


class DeployableModel(nn.Module):
    """uint8 (N, H, W, 3) RGB in, probabilities (N, classes) out: all preprocessing in the graph."""

    def __init__(self, predictor: Predictor) -> None:
        super().__init__()
        self.predictor = predictor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predictor(images.permute(0, 3, 1, 2))


def export_onnx(
    predictor: Predictor,
    path: Path,
    opset: int,
    metadata: dict[str, str],
    check_batch_sizes: list[int],
) -> onnx.ModelProto:
    """Write one self-contained ONNX file and check it against PyTorch at each batch size."""
    model = DeployableModel(predictor).eval()
    example = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    program = torch.onnx.export(
        model,
        (example,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
        dynamo=True,
        # Its eight progress lines per export say nothing a person needs; errors still raise.
        verbose=False,
    )
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, tmp)
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        generator = torch.Generator().manual_seed(0)
        for n in check_batch_sizes:
            images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=generator)
            (got,) = session.run(None, {INPUT_NAME: images.numpy()})
            with torch.inference_mode():
                want = model(images).numpy()
            if got.shape != want.shape or not np.allclose(got, want, atol=1e-5):
                raise PipelineError(f"exported graph disagrees with PyTorch at batch size {n}")
    return proto


def test_accuracy(eval_metrics: Path) -> float:
    try:
        return float(json.loads(eval_metrics.read_text())["test/acc"])
    except (OSError, ValueError, KeyError, TypeError):
        raise PipelineError(f"no test/acc in {eval_metrics}; run `dvc repro evaluate`") from None


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="cnnpipe export", description=__doc__).parse_args(argv)
    cfg: DictConfig = load_params()
    with tracking.stage_run(cfg, "export") as run:
        module = load_checkpoint(cfg.paths.checkpoint)
        commit, dirty = tracking.git_commit()
        metadata = {
            "class_names": json.dumps(module.hparams.class_names),
            "input_description": INPUT_DESCRIPTION,
            "model_name": cfg.mlflow.model_name,
            # What `cnnpipe serve` shows: evaluate scored the same Predictor this file computes.
            "test_accuracy": str(test_accuracy(Path(cfg.paths.eval_metrics))),
            "tta_flip": str(cfg.evaluate.tta.flip).lower(),
            "tta_shift": str(cfg.evaluate.tta.shift),
            "mlflow_run_id": run.info.run_id,
            "git_commit": commit + ("-dirty" if dirty else ""),
        }
        path = Path(cfg.paths.onnx)
        predictor = Predictor(module, **cfg.evaluate.tta)
        checks = list(cfg.export.check_batch_sizes)
        export_onnx(predictor, path, cfg.export.opset, metadata, checks)
    print(f"exported {path} ({path.stat().st_size:,} bytes, opset {cfg.export.opset})")

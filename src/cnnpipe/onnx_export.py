"""Write a PyTorch model of the contract's function as one self-contained ONNX file, checked
against PyTorch in onnxruntime before it replaces anything."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from cnnpipe import PipelineError, contract
from cnnpipe.files import atomic_path


def export_onnx(
    model: nn.Module,
    path: Path,
    metadata: contract.Metadata,
    opset: int,
    atol: float,
    check_batch_sizes: list[int],
) -> onnx.ModelProto:
    """`model` (uint8 (N, H, W, 3) in at its `size` (H, W), probabilities out) as ONNX at
    `path`, with `metadata`; its output must match PyTorch's within `atol` (parity.atol, as the
    parity stage checks it) at each of `check_batch_sizes`."""
    model = model.eval()
    example = torch.zeros(contract.input_shape(2, model.size), dtype=torch.uint8)
    program = torch.onnx.export(
        model,
        (example,),
        input_names=[contract.INPUT_NAME],
        output_names=[contract.OUTPUT_NAME],
        opset_version=opset,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
        dynamo=True,
        # Its eight progress lines per export say nothing a person needs; errors still raise.
        verbose=False,
    )
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata.to_props(model.size))
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, tmp)
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        generator = torch.Generator().manual_seed(0)
        for n in check_batch_sizes:
            shape = contract.input_shape(n, model.size)
            images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
            (got,) = session.run(None, {contract.INPUT_NAME: images.numpy()})
            with torch.inference_mode():
                want = model(images).numpy()
            if got.shape != want.shape or np.abs(got - want).max() > atol:
                raise PipelineError(f"exported graph disagrees with PyTorch at batch size {n}")
    return proto

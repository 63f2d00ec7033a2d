"""The exported model in onnxruntime: loaded, checked against the contract, run in batches."""

from pathlib import Path

import numpy as np
import onnxruntime as ort

from cnnpipe import PipelineError
from cnnpipe.artifact import contract

# Runs of up to this many images keep their memory for the next: the service's batches (64
# one-image requests at most, by default).
SHRINK_ABOVE = 64


class OnnxModel:
    """An onnxruntime session over a file `cnnpipe export` wrote, with its metadata."""

    def __init__(
        self, session: ort.InferenceSession, metadata: contract.Metadata, release_memory: bool
    ) -> None:
        self.session, self.metadata = session, metadata
        self.class_names = metadata.class_names
        # (height, width): the size the model takes its images at, from its input's shape.
        self.size = tuple(session.get_inputs()[0].shape[1:3])
        self.release_memory = release_memory
        self.shrink = ort.RunOptions()
        # onnxruntime's arena keeps what the largest batch needed: after one 900-image request
        # a service stayed at 273 MB (90 MB idle). Shrinking it after a run gives that back, but
        # doubles the time of a 64-image run, so only runs over SHRINK_ABOVE images shrink it.
        self.shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    @classmethod
    def load(cls, path: Path | str, release_memory: bool = False) -> "OnnxModel":
        """The model in `path`; `release_memory`: for a long-running service, whose threads wait
        between requests and which gives back what a large batch took."""
        options = ort.SessionOptions()
        if release_memory:
            # A service's threads wait for requests: spinning would take the CPU their HTTP needs.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own untyped exceptions
            raise PipelineError(f"{path} is not a loadable ONNX model ({error})") from None
        props = session.get_modelmeta().custom_metadata_map
        try:
            metadata = contract.Metadata.from_props(props)
        except KeyError:
            raise PipelineError(
                f"{path} has no class_names metadata; export it with `cnnpipe export`"
            ) from None
        except ValueError as reason:
            raise PipelineError(
                f"{path} has metadata `cnnpipe export` does not write ({reason}); export it again"
            ) from None
        check_signature(path, session, len(metadata.class_names))
        return cls(session, metadata, release_memory)

    def probabilities(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """The contract's (N, H, W, 3) uint8 RGB images -> (N, classes) probabilities."""
        return np.concatenate(
            [
                self.session.run(None, {contract.INPUT_NAME: part}, self.options(len(part)))[0]
                for part in (images[i : i + batch_size] for i in range(0, len(images), batch_size))
            ]
        )

    def options(self, images: int) -> ort.RunOptions | None:
        return self.shrink if self.release_memory and images > SHRINK_ABOVE else None

    def top_k(self, probs: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        order = np.argsort(-probs, axis=1)[:, :k]
        return [
            [(self.class_names[j], float(p[j])) for j in row]
            for p, row in zip(probs, order, strict=True)
        ]


def check_signature(path: Path | str, session: ort.InferenceSession, classes: int) -> None:
    """Refuse, in one line, a model that does not take and return what `cnnpipe export` writes:
    onnxruntime would otherwise fail on every request with its own traceback."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = inputs[0].shape if inputs else []
    # The model's own size, where its input has one: images are decoded to it.
    fixed = len(shape) == 4 and all(isinstance(d, int) for d in shape[1:3])
    expected = contract.signature(classes, tuple(shape[1:3]) if fixed else ("H", "W"))
    got = tuple(
        ", ".join(contract.describe(a.type, a.shape) for a in io) for io in (inputs, outputs)
    )
    if got != expected:
        raise PipelineError(
            f"{path} takes {got[0]} and returns {got[1]}; cnnpipe needs {expected[0]} images "
            f"in and {expected[1]} out, one probability per class name: export the model with "
            "`cnnpipe export`"
        )
    names = (inputs[0].name, outputs[0].name)
    if names != (contract.INPUT_NAME, contract.OUTPUT_NAME):
        raise PipelineError(
            f"{path} names its input {names[0]!r} and its output {names[1]!r}; cnnpipe needs "
            f"{contract.INPUT_NAME!r} and {contract.OUTPUT_NAME!r}: export the model with "
            "`cnnpipe export`"
        )


def checked_model(model_path: str) -> OnnxModel:
    """The model at `model_path`, run once: a model that loads but cannot run fails here, at
    start, and the first request does not pay for onnxruntime's first-run allocations."""
    onnx_model = OnnxModel.load(model_path, release_memory=True)
    try:
        onnx_model.probabilities(
            np.zeros(contract.input_shape(1, onnx_model.size), contract.INPUT_DTYPE)
        )
    except Exception as failure:  # onnxruntime raises its own untyped exceptions
        text = str(failure).strip()
        reason = text.splitlines()[0] if text else repr(failure)
        raise PipelineError(f"{model_path} loads but does not run ({reason})") from None
    return onnx_model

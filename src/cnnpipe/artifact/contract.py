"""The exported model's interface, in numpy only: what `cnnpipe export` writes into the ONNX file
and what parity, predict, the service, its v2 routes and the tests expect of one.

One uint8 RGB input (N, H, W, 3) at the model's own size, as images decode, and one float32
output (N, classes) of class probabilities; all preprocessing is inside the graph. The file's
metadata names the classes and says where the model came from; its input's shape gives the size.
"""

import json
from dataclasses import dataclass

import numpy as np

INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
CHANNELS = 3
INPUT_DTYPE, OUTPUT_DTYPE = np.dtype(np.uint8), np.dtype(np.float32)


def input_shape(n: int | str, size: tuple[int, int]) -> tuple:
    """(n, height, width, 3) for `size` (height, width)."""
    return (n, *size, CHANNELS)


def input_description(size: tuple[int, int]) -> str:
    """The input in words, for the file's metadata and the registry."""
    return f"uint8 RGB images as decoded, shape (N, {size[0]}, {size[1]}, 3), values 0-255"


def signature(classes: int, size: tuple[int, int]) -> tuple[str, str]:
    """The input and output as `describe` writes them: ("uint8 (N, 32, 32, 3)", "float
    (N, 10)"), in onnxruntime's type names."""
    return (
        f"uint8 ({', '.join(map(str, input_shape('N', size)))})",
        f"float (N, {classes})",
    )


def describe(type_name: str, shape: list) -> str:
    """An onnxruntime NodeArg's type and shape as `signature` writes them: a named or unknown
    axis is shown as N."""
    dims = ", ".join(str(d) if isinstance(d, int) else "N" for d in shape)
    return f"{type_name.removeprefix('tensor(').removesuffix(')')} ({dims})"


@dataclass(frozen=True)
class Metadata:
    """The ONNX file's metadata properties (all strings in the file)."""

    class_names: list[str]
    model_name: str | None = None
    # Of this file's function on the test set, as evaluate scored it.
    test_accuracy: float | None = None
    # The test-time views the graph averages over (cnnpipe.training.inference.tta_views).
    tta_views: tuple[str, ...] = ("image",)
    tta_shift: int = 1
    mlflow_run_id: str | None = None
    git_commit: str | None = None
    # The data set it was trained on, by name (data.name): "cifar10", "leaves".
    dataset: str | None = None
    # What drift is measured against: this file's outputs on the test split (data/drift.py).
    drift_reference: dict | None = None

    def to_props(self, size: tuple[int, int]) -> dict[str, str]:
        props = {
            "class_names": json.dumps(self.class_names),
            "input_description": input_description(size),
            "tta_views": json.dumps(list(self.tta_views)),
            "tta_shift": str(self.tta_shift),
        }
        for key in ("model_name", "dataset", "test_accuracy", "mlflow_run_id", "git_commit"):
            if getattr(self, key) is not None:
                props[key] = str(getattr(self, key))
        if self.drift_reference is not None:
            props["drift_reference"] = json.dumps(self.drift_reference)
        return props

    @classmethod
    def from_props(cls, props: dict[str, str]) -> "Metadata":
        """KeyError without class_names; ValueError for values that are not what export writes."""
        names = json.loads(props["class_names"])
        if not isinstance(names, list) or not names:
            raise ValueError("class_names must be a JSON list of names")
        accuracy = props.get("test_accuracy")
        return cls(
            class_names=[str(n) for n in names],
            model_name=props.get("model_name"),
            dataset=props.get("dataset"),
            test_accuracy=float(accuracy) if accuracy else None,
            **tta_of(props),
            mlflow_run_id=props.get("mlflow_run_id"),
            git_commit=props.get("git_commit"),
            drift_reference=drift_of(props),
        )


def drift_of(props: dict[str, str]) -> dict | None:
    """The drift reference of a file's metadata; None for files exported before they had one."""
    if "drift_reference" not in props:
        return None
    reference = json.loads(props["drift_reference"])
    if not isinstance(reference, dict) or not isinstance(reference.get("signals"), dict):
        raise ValueError("drift_reference must be a JSON object with signals")
    return reference


def tta_of(props: dict[str, str]) -> dict:
    """The test-time views of a file's metadata; files exported before views had names say
    tta_flip (the mirror too) and tta_shift (each of those moved both ways, 0 for none)."""
    if "tta_views" in props:
        return {
            "tta_views": tuple(json.loads(props["tta_views"])),
            "tta_shift": int(props["tta_shift"]),
        }
    views = ["image", "mirror"] if props.get("tta_flip") == "true" else ["image"]
    shift = int(props.get("tta_shift", 0))
    if shift:
        views += [f"{v}_{way}" for way in ("down_right", "up_left") for v in views]
    return {"tta_views": tuple(views), "tta_shift": shift or 1}

"""`cnnpipe predict MODEL.onnx PATH...`: classify image files with the exported ONNX model.

Only onnxruntime, numpy and Pillow are imported here (no torch, Lightning or MLflow), so a
deployment needs nothing else.
"""

import argparse
import csv
import glob
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, UnidentifiedImageError

from cnnpipe import PipelineError

SIZE = 32  # the model's input is SIZE x SIZE x 3 uint8 RGB
# Decoding is refused above this many pixels: a small file can claim a huge image.
MAX_PIXELS = 25_000_000


@dataclass
class Classifier:
    """An onnxruntime session over an exported model, with the class names from its metadata."""

    session: ort.InferenceSession
    class_names: list[str]
    input_name: str = field(init=False)

    def __post_init__(self) -> None:
        self.input_name = self.session.get_inputs()[0].name

    @classmethod
    def load(cls, path: Path | str) -> "Classifier":
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own untyped exceptions
            raise PipelineError(f"{path} is not a loadable ONNX model ({error})") from None
        metadata = session.get_modelmeta().custom_metadata_map
        if "class_names" not in metadata:
            raise PipelineError(
                f"{path} has no class_names metadata; export it with `cnnpipe export`"
            )
        class_names = json.loads(metadata["class_names"])
        check_signature(path, session, len(class_names))
        return cls(session, class_names)

    def probabilities(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(N, 32, 32, 3) uint8 RGB -> (N, classes) probabilities."""
        return np.concatenate(
            [
                self.session.run(None, {self.input_name: images[i : i + batch_size]})[0]
                for i in range(0, len(images), batch_size)
            ]
        )

    def top_k(self, probs: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        order = np.argsort(-probs, axis=1)[:, :k]
        return [
            [(self.class_names[j], float(p[j])) for j in row]
            for p, row in zip(probs, order, strict=True)
        ]


def describe(arg: ort.NodeArg) -> str:
    """'uint8 (N, 32, 32, 3)': a named or unknown axis is shown as N."""
    dims = ", ".join(str(d) if isinstance(d, int) else "N" for d in arg.shape)
    return f"{arg.type.removeprefix('tensor(').removesuffix(')')} ({dims})"


def check_signature(path: Path | str, session: ort.InferenceSession, classes: int) -> None:
    """Refuse, in one line, a model that does not take and return what `cnnpipe export` writes:
    onnxruntime would otherwise fail on every request with its own traceback."""
    expected = ("uint8 (N, 32, 32, 3)", f"float (N, {classes})")
    inputs, outputs = session.get_inputs(), session.get_outputs()
    got = (", ".join(map(describe, inputs)), ", ".join(map(describe, outputs)))
    if got != expected:
        raise PipelineError(
            f"{path} takes {got[0]} and returns {got[1]}; cnnpipe needs {expected[0]} images "
            f"in and {expected[1]} out, one probability per class name: export the model with "
            "`cnnpipe export`"
        )


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) gray scaled to 8 bits, float from 0-1: Pillow's convert()
    clips them at 255 instead, so a 16-bit gray picture would come out nearly white."""
    pixels = np.asarray(image)
    scaled = np.clip(pixels, 0, 1) * 255 if image.mode == "F" else np.clip(pixels, 0, 65535) / 257
    return Image.fromarray(np.round(scaled).astype(np.uint8))


def decode(data: bytes) -> tuple[np.ndarray, str | None]:
    """Image bytes -> (32, 32, 3) uint8 RGB, and a note when the image had to be resized.

    Raises ValueError with a short reason for anything Pillow cannot read as an image.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ValueError(f"image of {image.width}x{image.height} pixels is too large")
            image.load()
            if image.mode.startswith("I") or image.mode == "F":
                image = to_8bit(image)
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"not a readable image ({error.__class__.__name__})") from None
    note = None
    if rgb.size != (SIZE, SIZE):
        note = f"resized from {rgb.width}x{rgb.height}"
        rgb = rgb.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8), note


def expand(patterns: list[str]) -> list[Path]:
    """Files as given, folders by their files (recursively, sorted), globs by their matches."""
    paths: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.is_file())
        elif any(c in pattern for c in "*?["):
            paths += sorted(
                Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()
            )
        else:
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cnnpipe predict", description=__doc__)
    parser.add_argument("model", help="the exported ONNX file, e.g. models/model.onnx")
    parser.add_argument("paths", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--format", choices=["table", "json", "csv"], default="table")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    classifier = Classifier.load(args.model)
    k = max(1, min(args.top_k, len(classifier.class_names)))

    paths = expand(args.paths)
    if not paths:
        raise PipelineError(f"no files match {' '.join(args.paths)}")
    images, good, notes, failed = [], [], [], []
    for path in paths:
        try:
            image, note = decode(path.read_bytes())
        except (OSError, ValueError) as error:
            failed.append((path, str(error)))
            continue
        images.append(image)
        good.append(path)
        notes.append(note)
    results = []
    if images:
        probs = classifier.probabilities(np.stack(images), args.batch_size)
        results = list(zip(good, classifier.top_k(probs, k), notes, strict=True))

    if args.format == "json":
        rows = [
            {
                "path": str(p),
                "predictions": [{"label": c, "probability": q} for c, q in top],
                "note": n,
            }
            for p, top, n in results
        ]
        rows += [{"path": str(p), "error": e} for p, e in failed]
        print(json.dumps(rows, indent=2))
    elif args.format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "rank", "label", "probability", "note"])
        for p, top, n in results:
            writer.writerows(
                [str(p), r + 1, c, f"{q:.6f}", n or ""] for r, (c, q) in enumerate(top)
            )
        for p, e in failed:
            writer.writerow([str(p), "", "", "", f"error: {e}"])
    else:
        width = max(len(str(p)) for p in paths)
        for p, top, n in results:
            labels = "  ".join(f"{c} {q:6.1%}" for c, q in top)
            print(f"{str(p):<{width}}  {labels}" + (f"  ({n})" if n else ""))
    for p, e in failed:
        print(f"{p}: error: {e}", file=sys.stderr)
    if failed:
        sys.exit(1)

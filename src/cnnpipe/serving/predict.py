"""`cnnpipe predict MODEL.onnx PATH...`: classify image files with the exported ONNX model."""

import csv
import glob
import json
import sys
from pathlib import Path

import numpy as np

from cnnpipe import PipelineError
from cnnpipe.base.args import COUNT, Parser
from cnnpipe.data.images import decode
from cnnpipe.serving.onnx_model import OnnxModel


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
    parser = Parser(prog="cnnpipe predict", description=__doc__)
    parser.add_argument("model", help="the exported ONNX file, e.g. models/model.onnx")
    parser.add_argument("paths", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--top-k", type=COUNT, default=3)
    parser.add_argument("--format", choices=["table", "json", "csv"], default="table")
    parser.add_argument("--batch-size", type=COUNT, default=256)
    args = parser.parse_args(argv)
    model = OnnxModel.load(args.model)
    k = max(1, min(args.top_k, len(model.class_names)))

    paths = expand(args.paths)
    if not paths:
        raise PipelineError(f"no files match {' '.join(args.paths)}")
    images, good, notes, failed = [], [], [], []
    for path in paths:
        try:
            image, note = decode(path.read_bytes(), model.size)
        except (OSError, ValueError) as error:
            failed.append((path, str(error)))
            continue
        images.append(image)
        good.append(path)
        notes.append(note)
    results = []
    if images:
        probs = model.probabilities(np.stack(images), args.batch_size)
        results = list(zip(good, model.top_k(probs, k), notes, strict=True))

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

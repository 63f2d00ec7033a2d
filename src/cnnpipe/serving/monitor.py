"""`cnnpipe monitor DIR`: is what the service meets drifting from what its model was tested on?
Compares the images `cnnpipe serve --capture DIR` sampled at random with the test split, as the
model's file records it (cnnpipe/data/drift.py): one line per signal with its population
stability index and a verdict (under 0.1 stable, from 0.1 a moderate shift, from 0.25 a major
one), and a PNG of the distributions side by side. Unsure captures are kept because the model
was unsure, so they never enter it. The model compared is the one that answered the latest
sampled capture; captures by others are counted and left out."""

import json
from pathlib import Path

import numpy as np

from cnnpipe import PipelineError
from cnnpipe.base.args import Parser
from cnnpipe.data import drift
from cnnpipe.data.images import decode
from cnnpipe.serving.capture import DESCRIPTIONS, LINES

AXES = {"predicted_class": "class", "confidence": "top probability, from"} | {
    f"brightness_{c}": f"mean {c} value (0-255), from" for c in ("red", "green", "blue")
}


def sampled(folder: Path) -> list[dict]:
    """The sampled captures' records, in the order they were written."""
    path = folder / LINES
    if not path.is_file():
        raise PipelineError(
            f"{path} does not exist; start the service with `cnnpipe serve ... --capture {folder}`"
        )
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # review names such lines; a torn one cannot be a sample
        if isinstance(record, dict) and record.get("reason") == "sampled":
            records.append(record)
    if not records:
        raise PipelineError(
            f"no sampled captures in {path} yet: the service samples --capture-share of the "
            "answers it is sure of; send more images, or raise the share"
        )
    return records


def description(folder: Path, model: dict) -> dict:
    """What the service recorded of the model that answered (capture.py: describe)."""
    named = f"{model.get('name')} version {model.get('version')}"
    path = folder / DESCRIPTIONS / f"{model.get('sha256')}.json"
    try:
        described = json.loads(path.read_text())
    except (OSError, ValueError):
        raise PipelineError(
            f"{path} is missing or unreadable, so the reference of {named} is unknown; "
            "captures made from now on record it"
        ) from None
    if not described.get("drift_reference"):
        raise PipelineError(
            f"{named} has no drift reference in its file; export it again (`dvc repro export`) "
            "and serve the new file"
        )
    return described


def rows_of(folder: Path, records: list[dict], model: dict) -> tuple[np.ndarray, list[str]]:
    """The signals of each record's image (drift.values), and the files that could not be read."""
    names, size = model["class_names"], tuple(model["size"])
    rows, unread = [], []
    for record in records:
        try:
            image, _ = decode((folder / record["file"]).read_bytes(), size)
            probs = np.array([[record["probabilities"][n] for n in names]], np.float32)
        except (OSError, ValueError, KeyError, TypeError):
            unread.append(str(record.get("file")))
            continue
        rows.append(drift.values(image[None], probs)[0])
    return np.array(rows, np.float32).reshape(-1, len(drift.SIGNALS)), unread


def plot(rows: np.ndarray, model: dict, psi: dict[str, float], title: str, path: Path) -> None:
    """The reference's and the captures' shares of each signal, side by side, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cnnpipe.base.files import atomic_path

    reference = model["drift_reference"]["signals"]
    fig, axes = plt.subplots(1, len(drift.SIGNALS), figsize=(4 * len(drift.SIGNALS), 3.6))
    for i, (name, ax) in enumerate(zip(drift.SIGNALS, axes, strict=True)):
        edges = np.asarray(reference[name]["edges"])
        seen = drift.counts(rows[:, i : i + 1], [edges])[0] / len(rows)
        x, width = np.arange(len(seen)), 0.4
        ax.bar(x - width / 2, reference[name]["shares"], width, label="test split")
        ax.bar(x + width / 2, seen, width, label="sampled captures")
        # The bins after the class are the test split's tenths, labelled by where they start.
        ticks = model["class_names"] if i == 0 else [f"{e:.3g}" for e in edges[:-1]]
        ax.set_xticks(x, ticks, rotation=90, fontsize=7)
        ax.set_xlabel(AXES[name])
        ax.set_title(
            f"{name.replace('_', ' ')}\nPSI {psi[name]:.3f}: {drift.verdict(psi[name], len(rows))}"
        )
    axes[0].set_ylabel("share of images")
    fig.suptitle(title)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper right", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def report(rows: np.ndarray, model: dict) -> tuple[str, dict[str, float]]:
    """The lines people read, and each signal's PSI."""
    psi = drift.compare(model["drift_reference"], rows)
    tested = model["drift_reference"]["images"]
    lines = [
        f"{model['name']} version {model['version']}: {len(rows):,} sampled captures against "
        f"{tested:,} test images"
    ]
    for name, value in psi.items():
        lines.append(
            f"  {name.replace('_', ' '):<17} PSI {value:6.3f}  {drift.verdict(value, len(rows))}"
        )
    return "\n".join(lines), psi


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="cnnpipe monitor", description=__doc__)
    parser.add_argument("folder", help="the folder `cnnpipe serve --capture` wrote")
    parser.add_argument("--png", help="where the plot goes (default: DIR/drift.png)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    records = sampled(folder)
    latest = records[-1].get("model") or {}
    mine = [r for r in records if r.get("model") == latest]
    model = description(folder, latest)
    rows, unread = rows_of(folder, mine, model)
    if not len(rows):
        raise PipelineError(f"none of the {len(mine)} sampled captures' files can be read")
    text, psi = report(rows, model)
    print(text)
    if others := len(records) - len(mine):
        print(f"left out: {others:,} sampled captures answered by other models")
    if unread:
        shown = ", ".join(unread[:3]) + (" ..." if len(unread) > 3 else "")
        print(f"skipped {len(unread)} missing or unreadable: {shown}")
    png = Path(args.png or folder / "drift.png")
    plot(rows, model, psi, text.splitlines()[0], png)
    print(f"wrote {png}")

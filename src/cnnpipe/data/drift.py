"""How far what a model meets has drifted from what it was tested on, in numpy only.

A reference, made by `evaluate` on the test split and carried in the model file's metadata,
holds the share of images in each bin of five signals: the predicted class, the top probability
(confidence) and each channel's mean brightness. The service (`cnnpipe_drift_*` on /metrics) and
`cnnpipe monitor` bin the images they see the same way and compare with the population
stability index: PSI = sum over bins of (seen - reference) * ln(seen / reference).
"""

import numpy as np

SIGNALS = ("predicted_class", "confidence", "brightness_red", "brightness_green", "brightness_blue")
CONFIDENCE_EDGES = np.linspace(0, 1, 11)
BRIGHTNESS_EDGES = np.linspace(0, 256, 17)
# A bin without images would make PSI infinite; this is its share instead, the usual floor.
FLOOR = 1e-4
# The usual reading of PSI: under 0.1 no real change, over 0.25 a major one.
STABLE, MAJOR = 0.1, 0.25
# Fewer images than this fill bins unevenly by chance alone: PSI reads as drift on its own.
MIN_IMAGES = 100


def values(images: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """(N, 5) float32 of the contract's (N, H, W, 3) uint8 images and their probabilities: each
    image's predicted class, top probability and mean red, green and blue, in SIGNALS' order."""
    return np.column_stack(
        [
            probabilities.argmax(1),
            probabilities.max(1),
            images.reshape(len(images), -1, 3).mean(1),
        ]
    ).astype(np.float32)


def edges(classes: int) -> list[np.ndarray]:
    """Each signal's bin edges: one bin per class, ten of confidence, sixteen of brightness."""
    return [np.arange(classes + 1) - 0.5, CONFIDENCE_EDGES, *[BRIGHTNESS_EDGES] * 3]


def shares(rows: np.ndarray, bins: list[np.ndarray]) -> list[np.ndarray]:
    """The share of `rows` (from `values`) in each bin of each signal."""
    return [np.histogram(rows[:, i], b)[0] / max(len(rows), 1) for i, b in enumerate(bins)]


def reference(images: np.ndarray, probabilities: np.ndarray) -> dict:
    """What a model's file carries to be compared with: its bins and shares on `images`."""
    bins = edges(probabilities.shape[1])
    seen = shares(values(images, probabilities), bins)
    return {
        "images": len(images),
        "signals": {
            name: {"edges": b.tolist(), "shares": s.round(6).tolist()}
            for name, b, s in zip(SIGNALS, bins, seen, strict=True)
        },
    }


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """The population stability index of `actual` shares against `expected` ones."""
    e, a = np.maximum(expected, FLOOR), np.maximum(actual, FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def compare(ref: dict, rows: np.ndarray) -> dict[str, float]:
    """PSI of each signal of `rows` (from `values`) against the reference `ref`."""
    signals = [ref["signals"][name] for name in SIGNALS]
    seen = shares(rows, [np.asarray(s["edges"]) for s in signals])
    return {
        name: round(psi(np.asarray(s["shares"]), got), 4)
        for name, s, got in zip(SIGNALS, signals, seen, strict=True)
    }


def verdict(value: float, images: int) -> str:
    """PSI in words, for people."""
    if images < MIN_IMAGES:
        return f"too few images to tell (under {MIN_IMAGES})"
    if value < STABLE:
        return "stable"
    return "moderate shift" if value < MAJOR else "major shift"

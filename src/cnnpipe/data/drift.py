"""How far what a model meets has drifted from what it was tested on, in numpy only.

A reference, made by `evaluate` on the test split and carried in the model file's metadata,
holds the bins of five signals and the share of test images in each: the predicted class (a bin
per class), the top probability (confidence) and each channel's mean brightness (the test
split's deciles, so that each bin holds a tenth of it). The service (`cnnpipe_drift_*` on
/metrics) and `cnnpipe monitor` bin the images they see the same way and compare with the
population stability index: PSI = sum over bins of (seen - reference) * ln(seen / reference).
"""

import numpy as np

SIGNALS = ("predicted_class", "confidence", "brightness_red", "brightness_green", "brightness_blue")
# The range of each signal after the predicted class: a bin's edges never leave out a value.
RANGES = [(0.0, 1.0), *[(0.0, 256.0)] * 3]
DECILES = np.linspace(0, 1, 11)[1:-1]
# Half an image added to each bin of what is seen: a bin that a few hundred images leave empty by
# chance would otherwise count as a large drift. A reference bin without images (a class the
# model never predicted on the test split) counts as this share.
SMOOTHING = 0.5
FLOOR = 1e-4
# The usual reading of PSI: under 0.1 no real change, over 0.25 a major one.
STABLE, MAJOR = 0.1, 0.25
# Fewer images than this fill ten bins unevenly by chance alone: about 9/n of PSI, 0.02 here,
# and up to three times that in one signal of five.
MIN_IMAGES = 500


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


def bins_of(rows: np.ndarray, classes: int) -> list[np.ndarray]:
    """Each signal's bin edges: one bin per class, then the deciles of `rows` (from `values`)
    within each signal's whole range."""
    bins = [np.arange(classes + 1) - 0.5]
    for column, (low, high) in enumerate(RANGES, 1):
        inner = np.quantile(rows[:, column].astype(np.float64), DECILES)
        bins.append(np.unique(np.concatenate([[low], inner, [high]])))
    return bins


def counts(rows: np.ndarray, bins: list[np.ndarray]) -> list[np.ndarray]:
    """How many of `rows` fall in each bin of each signal."""
    return [np.histogram(rows[:, i], b)[0] for i, b in enumerate(bins)]


def reference(images: np.ndarray, probabilities: np.ndarray) -> dict:
    """What a model's file carries to be compared with: its bins and shares on `images`."""
    rows = values(images, probabilities)
    bins = bins_of(rows, probabilities.shape[1])
    return {
        "images": len(rows),
        "signals": {
            name: {"edges": b.tolist(), "shares": (c / len(rows)).round(6).tolist()}
            for name, b, c in zip(SIGNALS, bins, counts(rows, bins), strict=True)
        },
    }


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """The population stability index of `actual` shares against `expected` ones."""
    e, a = np.maximum(expected, FLOOR), np.maximum(actual, FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def compare(ref: dict, rows: np.ndarray) -> dict[str, float]:
    """PSI of each signal of `rows` (from `values`) against the reference `ref`."""
    signals = [ref["signals"][name] for name in SIGNALS]
    seen = counts(rows, [np.asarray(s["edges"]) for s in signals])
    return {
        name: round(
            psi(np.asarray(s["shares"]), (c + SMOOTHING) / (c.sum() + SMOOTHING * len(c))), 4
        )
        for name, s, c in zip(SIGNALS, signals, seen, strict=True)
    }


def verdict(value: float, images: int) -> str:
    """PSI in words, for people."""
    if images < MIN_IMAGES:
        return f"too few images to tell (under {MIN_IMAGES})"
    if value < STABLE:
        return "stable"
    return "moderate shift" if value < MAJOR else "major shift"

"""Drift: the reference a model file carries, the service's `cnnpipe_drift_*` gauges and
`cnnpipe monitor`, on streams like the test split and shifted from it."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from cnnpipe import cli
from cnnpipe.data import drift
from cnnpipe.serving.app import Limits, create_app
from cnnpipe.serving.capture import Settings
from cnnpipe.serving.drift import Window
from cnnpipe.serving.onnx_model import OnnxModel
from cnnpipe.serving.server import running
from tests.helpers import CLASSES, call, export_random_model, png, samples, with_reference


def pictures(n: int, seed: int, low: float = 40, high: float = 200) -> np.ndarray:
    """(n, 32, 32, 3) uint8: each image and channel a brightness from low..high, plus noise."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(low, high, (n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 20, (n, 32, 32, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A model whose reference is its answers to 1,000 pictures: its test split."""
    path = export_random_model(tmp_path_factory.mktemp("drift") / "model.onnx", CLASSES, ("image",))
    with_reference(path, pictures(1000, seed=0))
    return path


def infer(url: str, images: np.ndarray) -> None:
    """Send `images` through the v2 route, 100 at a time."""
    for i in range(0, len(images), 100):
        part = images[i : i + 100]
        body = {"inputs": [{"name": "images", "shape": list(part.shape), "datatype": "UINT8",
                            "data": part.reshape(-1).tolist()}]}  # fmt: skip
        status, _ = call(
            f"{url}/v2/models/cnnpipe-test/infer", json.dumps(body).encode(), "application/json"
        )
        assert status == 200


def gauges(url: str) -> dict[str, float]:
    return {
        name.removeprefix("cnnpipe_drift_"): value
        for (name, _), value in samples(url).items()
        if name.startswith("cnnpipe_drift_")
    }


def test_psi_is_the_sum_over_bins_with_empty_bins_floored():
    expected, actual = np.array([0.5, 0.5, 0.0]), np.array([0.9, 0.1, 0.0])
    by_hand = 0.4 * math.log(0.9 / 0.5) + (-0.4) * math.log(0.1 / 0.5)
    assert drift.psi(expected, actual) == pytest.approx(by_hand)
    # A bin the reference never saw counts as drift, finitely.
    floor = drift.FLOOR
    by_hand = (
        (0.5 - 0.5) * 0 + (0.3 - 0.5) * math.log(0.3 / 0.5) + (0.2 - floor) * math.log(0.2 / floor)
    )
    assert drift.psi(expected, np.array([0.5, 0.3, 0.2])) == pytest.approx(by_hand)


def ramp(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n images of 1x4 pixels whose mean, in each channel, is i/4 for image i; the top
    probability of image i is 0.5 + i/(2n), on class i % 2 of two."""
    i = np.arange(n)
    pixels = i[:, None] // 4 + (np.arange(4)[None] < (i % 4)[:, None])
    images = np.repeat(pixels[:, None, :, None], 3, axis=3).astype(np.uint8)
    top = 0.5 + i / (2 * n)
    probs = np.where((i % 2 == 0)[:, None], np.c_[top, 1 - top], np.c_[1 - top, top])
    return images, probs.astype(np.float32)


def test_a_reference_holds_a_bin_per_class_and_the_test_splits_tenths():
    images, probs = ramp(1000)
    assert images[999].mean() == 999 / 4 and probs[999].max() == np.float32(0.9995)
    ref = drift.reference(images, probs)
    signals = ref["signals"]
    assert ref["images"] == 1000
    assert signals["predicted_class"] == {"edges": [-0.5, 0.5, 1.5], "shares": [0.5, 0.5]}
    for name in drift.SIGNALS[1:]:
        # 1,000 distinct values: each tenth holds 100 of them, and the outer bins reach the ends
        # of the signal's range.
        assert signals[name]["shares"] == [0.1] * 10
        edges = signals[name]["edges"]
        assert (edges[0], edges[-1]) == ((0, 1) if name == "confidence" else (0, 256))
    assert signals["brightness_red"]["edges"][1] == pytest.approx(
        np.quantile(np.arange(1000) / 4, 0.1)
    )
    # The same images again: every bin as the reference's, PSI 0.
    assert drift.compare(ref, drift.values(images, probs)) == dict.fromkeys(drift.SIGNALS, 0.0)


def test_what_is_seen_is_smoothed_by_half_an_image_a_bin():
    images, probs = ramp(1000)
    ref = drift.reference(images, probs)
    # The darkest 100: all in the first tenth of each brightness, and of confidence.
    got = drift.compare(ref, drift.values(images[:100], probs[:100]))
    seen = np.array([100.5] + [0.5] * 9) / 105
    by_hand = sum((s - 0.1) * math.log(s / 0.1) for s in seen)
    assert got["brightness_blue"] == got["confidence"] == round(by_hand, 4)
    assert got["predicted_class"] == 0.0


@pytest.mark.parametrize(
    "stream, low, high, drifted",
    [("like the test split", 40, 200, []), ("brighter", 140, 255, ["brightness_red"])],
)
def test_the_gauges_hold_the_psi_of_the_last_answers(model, stream, low, high, drifted):
    sent = pictures(600, seed=1, low=low, high=high)
    app = create_app(str(model), Limits(drift_window=500))
    with running(app) as url:
        infer(url, sent)
        got = gauges(url)
    # The last 500 answers against the reference, recomputed here from the model's answers.
    last = sent[-500:]
    reference = OnnxModel.load(model).metadata.drift_reference
    want = drift.compare(reference, drift.values(last, OnnxModel.load(model).probabilities(last)))
    assert got == {"window_images": 500, **want}
    if not drifted:
        assert max(want.values()) < drift.STABLE, want
    for name in drifted:
        assert want[name] > drift.MAJOR, want


def test_a_file_without_a_reference_serves_without_the_gauges(tmp_path):
    path = export_random_model(tmp_path / "model.onnx", CLASSES, ("image",))
    with running(create_app(str(path))) as url:
        infer(url, pictures(10, seed=1))
        assert gauges(url) == {}
        assert samples(url)[("cnnpipe_images_classified_total", ())] == 10


def test_a_swapped_in_model_is_compared_with_its_own_reference_from_then_on(model, tmp_path):
    other = export_random_model(tmp_path / "other.onnx", CLASSES, ("image",))
    with_reference(other, pictures(1000, seed=0, low=140, high=255))
    app = create_app(str(model))
    with running(app) as url:
        infer(url, pictures(200, seed=1))
        app.state.service.swap(str(other), {"name": "cnnpipe-test", "version": "2"})
        assert gauges(url) == {"window_images": 0}
        bright = pictures(200, seed=2, low=140, high=255)
        infer(url, bright)
        got = gauges(url)
    reference = OnnxModel.load(other).metadata.drift_reference
    want = drift.compare(
        reference, drift.values(bright, OnnxModel.load(other).probabilities(bright))
    )
    assert got == {"window_images": 200, **want}


def test_the_workers_windows_are_one(tmp_path, monkeypatch):
    """Each worker maps the same window: what one adds, another reads."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    one, two = Window(3), Window(3)
    rows = np.arange(4 * 5, dtype=np.float32).reshape(4, 5)
    one.add(rows[:2])
    two.add(rows[2:])
    assert np.array_equal(one.latest(), rows[[3, 1, 2]])  # the last three, the oldest overwritten
    two.clear()
    assert len(one.latest()) == 0


def captured(model, tmp_path, images: np.ndarray, share: float = 1.0):
    """A capture folder that sampled a `share` of the answers to `images`, sent as PNG files, and
    kept all others as unsure."""
    folder = tmp_path / "captured"
    keep = Settings(str(folder), unsure_below=1.0, sample_share=share)
    app = create_app(
        str(model), Limits(drift_window=len(images)), {"name": "m", "version": "3"}, keep
    )
    with running(app) as url:
        for image in images:
            assert call(f"{url}/predict", png(image), "image/png")[0] == 200
        app.state.service.capture.close()
        return folder, gauges(url)


def monitor(*argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["monitor", *argv])
    return str(exit_.value.code)


def test_monitor_compares_the_sampled_captures_as_the_service_does(model, tmp_path, capsys):
    folder, served = captured(model, tmp_path, pictures(500, seed=3, low=140, high=255))
    cli.main(["monitor", str(folder)])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "m version 3: 500 sampled captures against 1,000 test images"
    for line, name in zip(out[1:6], drift.SIGNALS, strict=True):
        words = line.split()
        assert words[:3] == [*name.split("_"), "PSI"][:3] or words[0] == name.split("_")[0]
        value = float(line.split("PSI")[1].split()[0])
        assert value == pytest.approx(served[name], abs=5e-4)
        assert line.endswith(drift.verdict(served[name], 500))
    assert "major shift" in out[3]  # brightness red
    assert out[-1] == f"wrote {folder / 'drift.png'}"
    with Image.open(folder / "drift.png") as plot:
        assert plot.format == "PNG" and plot.width > 4 * plot.height
    assert not [p for p in folder.iterdir() if "partial" in p.name]


def test_monitor_leaves_unsure_captures_out(model, tmp_path):
    folder, _ = captured(model, tmp_path, pictures(5, seed=3), share=0.0)
    said = monitor(str(folder))
    assert said.startswith(f"cnnpipe monitor: error: no sampled captures in {folder}")
    assert "\n" not in said


def test_monitor_says_in_one_line_what_it_cannot_compare(tmp_path):
    assert monitor(str(tmp_path)) == (
        f"cnnpipe monitor: error: {tmp_path}/captured.jsonl does not exist; start the service "
        f"with `cnnpipe serve ... --capture {tmp_path}`"
    )
    plain = export_random_model(tmp_path / "plain.onnx", CLASSES, ("image",))
    folder, _ = captured(plain, tmp_path, pictures(3, seed=3))
    assert monitor(str(folder)) == (
        "cnnpipe monitor: error: m version 3 has no drift reference in its file; export it again "
        "(`dvc repro export`) and serve the new file"
    )
    os.remove(next((folder / "models").iterdir()))
    said = monitor(str(folder))
    assert "is missing or unreadable, so the reference of m version 3 is unknown" in said

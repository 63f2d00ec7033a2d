"""`cnnpipe serve --capture`: what the service keeps of its answers, written off the request path,
once per image, within a size limit, and never at the cost of an answer."""

import hashlib
import io
import json
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from cnnpipe.serving.app import Limits, create_app
from cnnpipe.serving.capture import LINES, Capture, Settings
from cnnpipe.serving.onnx_model import OnnxModel
from cnnpipe.serving.server import running
from tests.helpers import CLASSES, call, export_random_model, png, samples

MODEL = {"name": "cnnpipe-test", "version": "3", "sha256": "ab" * 32}


def image(seed: int, kind: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=kind)
    return out.getvalue()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def probabilities(top: float) -> np.ndarray:
    """Ten classes with `top` on the first and the rest shared."""
    return np.array([top, *[(1 - top) / 9] * 9], dtype=np.float32)


def lines(folder: Path) -> list[dict]:
    path = folder / LINES
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def count(registry: CollectorRegistry, name: str, reason: str) -> float:
    return registry.get_sample_value(name, {"reason": reason}) or 0


@pytest.fixture
def capture(tmp_path):
    def make(**settings) -> tuple[Capture, CollectorRegistry]:
        registry = CollectorRegistry()
        kept = Capture(Settings(str(tmp_path / "captured"), **settings), MODEL, CLASSES, registry)
        return kept, registry

    return make


def test_unsure_answers_are_kept_as_received_once_each(capture, tmp_path):
    kept, registry = capture(unsure_below=0.5, sample_share=0)
    jpeg, png_bytes, sure = image(1, "JPEG"), image(2), image(3)
    kept.offer(
        [jpeg, png_bytes, sure], np.stack([probabilities(p) for p in (0.3, 0.49, 0.9)]), "/p"
    )
    kept.offer([jpeg], probabilities(0.2)[None], "/predict")  # the same image again
    kept.close()
    folder = tmp_path / "captured"
    names = {f"{hashlib.sha256(d).hexdigest()}.{e}" for d, e in ((jpeg, "jpg"), (png_bytes, "png"))}
    assert {p.name for p in folder.iterdir() if not p.name.startswith(".")} == {*names, LINES}
    for record in lines(folder):
        assert (folder / record["file"]).read_bytes() in (jpeg, png_bytes), "as received"
        assert record["digest"] == record["file"].split(".")[0]
        assert (record["reason"], record["route"], record["model"]) == ("unsure", "/p", MODEL)
        assert list(record["probabilities"]) == CLASSES
        assert record["time"].endswith("Z")
    assert [r["probabilities"]["airplane"] for r in lines(folder)] == pytest.approx([0.3, 0.49])
    assert count(registry, "cnnpipe_captured_total", "unsure") == 2


@pytest.mark.parametrize("share, reasons", [(0.0, ["unsure"] * 10), (1.0, ["sampled"] * 20)])
def test_a_share_of_all_answers_is_sampled_sure_or_not(capture, tmp_path, share, reasons):
    kept, registry = capture(unsure_below=0.5, sample_share=share)
    tops = [0.9, 0.3] * 10
    kept.offer([image(i) for i in range(20)], np.stack([probabilities(t) for t in tops]), "/p")
    kept.close()
    records = lines(tmp_path / "captured")
    assert [r["reason"] for r in records] == reasons
    assert count(registry, "cnnpipe_captured_total", reasons[0]) == len(reasons)


def test_the_sample_is_drawn_at_the_share_whatever_the_confidence(capture, tmp_path):
    kept, registry = capture(unsure_below=0.5, sample_share=0.25)
    kept.random.seed(7)
    tops = [0.9, 0.3] * 200
    kept.offer([image(i) for i in range(400)], np.stack([probabilities(t) for t in tops]), "/p")
    kept.close()
    draws = random.Random(7)
    drawn = [i for i in range(400) if draws.random() < 0.25]
    records = {r["digest"]: r["reason"] for r in lines(tmp_path / "captured")}
    sampled = [i for i in range(400) if records.get(digest(image(i))) == "sampled"]
    assert sampled == drawn
    assert {tops[i] for i in sampled} == {0.9, 0.3}
    unsure = [i for i in range(400) if records.get(digest(image(i))) == "unsure"]
    assert unsure == [i for i in range(1, 400, 2) if i not in drawn]


def test_a_tensor_is_kept_as_png(capture, tmp_path):
    kept, _ = capture(unsure_below=1.0)
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    kept.offer([pixels], probabilities(0.4)[None], "/v2/models/m/infer")
    kept.close()
    (record,) = lines(tmp_path / "captured")
    assert record["file"].endswith(".png")
    with Image.open(tmp_path / "captured" / record["file"]) as saved:
        assert np.array_equal(np.asarray(saved), pixels)


def test_capture_stops_at_its_size_limit_and_says_so_once(capture, tmp_path, capfd):
    one = len(image(0))
    # Room for two images and their lines, not three.
    kept, registry = capture(unsure_below=1.0, max_mb=(2 * one + 1500) / (1 << 20))
    kept.offer([image(i) for i in range(5)], np.stack([probabilities(0.3)] * 5), "/predict")
    kept.close()
    assert len(lines(tmp_path / "captured")) == 2
    assert count(registry, "cnnpipe_capture_dropped_total", "limit") == 3
    said = capfd.readouterr().err.splitlines()
    assert len(said) == 1 and said[0].startswith(f"capture: stopped, {tmp_path / 'captured'} holds")


def test_a_folder_that_cannot_be_written_costs_nothing_but_a_line(tmp_path, capfd):
    (tmp_path / "a-file").write_text("")
    registry = CollectorRegistry()
    kept = Capture(Settings(str(tmp_path / "a-file" / "captured")), MODEL, CLASSES, registry)
    kept.offer([image(1), image(2)], np.stack([probabilities(0.1)] * 2), "/predict")
    kept.close()
    assert count(registry, "cnnpipe_capture_dropped_total", "error") == 2
    assert capfd.readouterr().err == (
        f"capture: cannot write to {tmp_path / 'a-file' / 'captured'} (Not a directory); "
        "answers go on, their images are not kept\n"
    )


def test_a_full_disk_costs_nothing_but_a_line(tmp_path, capfd):
    full = tmp_path / "small"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)])
    if mounted.returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        registry = CollectorRegistry()
        kept = Capture(Settings(str(full)), MODEL, CLASSES, registry)
        big = [np.random.default_rng(i).integers(0, 256, (96, 96, 3), np.uint8) for i in range(5)]
        kept.offer([png(b) for b in big], np.stack([probabilities(0.1)] * 5), "/predict")
        kept.close()
        written = len(lines(full))
        assert (
            written < 5 and count(registry, "cnnpipe_capture_dropped_total", "error") == 5 - written
        )
        assert "(No space left on device); answers go on" in capfd.readouterr().err
        assert not [p for p in full.iterdir() if p.name.endswith(".partial")]
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_the_service_answers_as_before_and_keeps_what_it_answered(tmp_path):
    model_path = export_random_model(tmp_path / "model.onnx", CLASSES, ("image",))
    keep = Settings(str(tmp_path / "captured"), unsure_below=1.0, sample_share=0.0)
    app = create_app(str(model_path), Limits(), {"name": "m", "version": "7"}, keep)
    images = [image(i) for i in range(8)]
    with running(app) as url, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: call(f"{url}/predict", b, "image/png"), images))
        tensor = np.random.default_rng(9).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
        body = {"inputs": [{"name": "images", "shape": [1, 32, 32, 3], "datatype": "UINT8",
                            "data": tensor.reshape(-1).tolist()}]}  # fmt: skip
        status, _ = call(f"{url}/v2/models/m/infer", json.dumps(body).encode(), "application/json")
        assert status == 200 and all(a[0] == 200 for a in answers)
        app.state.service.capture.close()
        metrics = samples(url)
    model = OnnxModel.load(model_path)
    records = {r["digest"]: r for r in lines(tmp_path / "captured")}
    assert len(records) == 9
    for data in images:
        record = records[hashlib.sha256(data).hexdigest()]
        want = model.probabilities(np.asarray(Image.open(io.BytesIO(data)))[None])[0]
        got = np.array(list(record["probabilities"].values()))
        assert np.allclose(got, want, atol=1e-6) and record["route"] == "/predict"
        sha256 = hashlib.sha256(model_path.read_bytes()).hexdigest()
        assert record["model"] == {"name": "m", "version": "7", "sha256": sha256}
    assert [r["route"] for r in records.values()].count("/v2/models/m/infer") == 1
    assert metrics[("cnnpipe_captured_total", (("reason", "unsure"),))] == 9


def test_worker_processes_share_the_folder_and_its_lines(tmp_path):
    """Two processes of `cnnpipe serve --workers 2 --capture` append to one captured.jsonl: every
    image once, every line whole, the counters of both on /metrics."""
    from cnnpipe.base.localhost import free_port, wait_for_http, wait_until

    model_path = export_random_model(tmp_path / "model.onnx", CLASSES, ("image",))
    folder, port = tmp_path / "captured", free_port()
    command = [str(Path(sys.executable).parent / "cnnpipe"), "serve", str(model_path)]
    options = ["--port", str(port), "--workers", "2", "--capture", str(folder)]
    service = subprocess.Popen(
        [*command, *options, "--capture-unsure-below", "1", "--capture-share", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health/ready", service, "cnnpipe serve", deadline_s=60)
        images = [image(i) for i in range(40)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda b: call(f"{url}/predict", b, "image/png"), images))
        assert [status for status, _ in answers] == [200] * 40
        wait_until("40 lines", lambda: len(lines(folder)) == 40, 30)
        assert {r["digest"] for r in lines(folder)} == {
            hashlib.sha256(b).hexdigest() for b in images
        }
        assert samples(url)[("cnnpipe_captured_total", (("reason", "unsure"),))] == 40
        service.terminate()
        assert service.wait(timeout=30) == 0
    finally:
        service.kill()
        service.wait(timeout=30)

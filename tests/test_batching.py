"""Concurrent requests classified together: one model call for many clients, every answer its
own image's, and a full queue answered 503 at once."""

import asyncio
import concurrent.futures
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from cnnpipe.base.localhost import wait_until
from cnnpipe.data.images import decode
from cnnpipe.serving.app import Limits, create_app
from cnnpipe.serving.batching import Batcher
from cnnpipe.serving.onnx_model import OnnxModel
from cnnpipe.serving.server import running
from tests.helpers import CLASSES, call, export_random_model, png, samples


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    return export_random_model(path, CLASSES)


def image(seed: int) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def post_all(url: str, bodies: list[bytes]) -> list[tuple[int, dict]]:
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: call(f"{url}/predict", body, "image/png"), bodies))


def test_concurrent_requests_share_one_model_call_and_get_their_own_answers(model_path):
    bodies = [image(seed) for seed in range(7)] + [b"\x89PNG\r\n\x1a\n" + bytes(100)]
    # A window long enough for all eight to arrive: the eighth fills the batch and starts it.
    limits = Limits(top_k=len(CLASSES), max_batch=len(bodies), batch_window_s=30)
    with running(create_app(str(model_path), limits)) as url:
        start = time.perf_counter()
        answers = post_all(url, bodies)
        seconds = time.perf_counter() - start
        got = samples(url)
    assert seconds < 10, "a full batch does not wait for the window"
    assert got[("cnnpipe_batch_requests_count", ())] == 1
    assert got[("cnnpipe_batch_requests_sum", ())] == 7, "the bad image is not classified"
    assert got[("cnnpipe_batch_images_bucket", (("le", "8.0"),))] == 1
    assert got[("cnnpipe_batch_images_bucket", (("le", "4.0"),))] == 0
    model = OnnxModel.load(model_path)
    for body, (status, answer) in zip(bodies[:7], answers[:7], strict=True):
        alone = model.probabilities(decode(body, model.size)[0][None])[0]
        top = answer["predictions"][0]["top_k"]
        assert status == 200 and len(top) == len(CLASSES)
        for entry in top:
            assert entry["probability"] == pytest.approx(
                alone[CLASSES.index(entry["label"])], abs=1e-6
            )
    assert answers[7][0] == 400 and "not a readable image" in answers[7][1]["error"]


def test_a_full_queue_is_answered_503_at_once_and_the_queued_requests_are_served(model_path):
    limits = Limits(max_batch=64, batch_window_s=3, max_queue=2)
    with running(create_app(str(model_path), limits)) as url:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            queued = [pool.submit(call, f"{url}/predict", image(i), "image/png") for i in range(2)]
            wait_until(
                "two queued requests",
                lambda: samples(url)[("cnnpipe_batch_queue", ())] == 2,
                10,
            )
            start = time.perf_counter()
            status, answer = call(f"{url}/predict", image(2), "image/png")
            seconds = time.perf_counter() - start
            assert status == 503 and "busy (2 requests waiting): retry shortly" in answer["error"]
            assert seconds < 1, "refused at once, not after the window"
            assert [f.result(timeout=30)[0] for f in queued] == [200, 200]
        assert samples(url)[("cnnpipe_batch_queue", ())] == 0


def test_requests_that_fail_unexpectedly_do_not_stop_the_batcher():
    calls = []

    def classify(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("the model failed")
        return np.ones((len(images), 2), np.float32)

    def broken() -> tuple[np.ndarray, None]:
        raise RuntimeError("not an error a decoder should raise")

    async def scenario() -> tuple[np.ndarray, str]:
        batcher = Batcher(classify, max_batch=8, window_s=0, max_queue=8,
                          registry=CollectorRegistry())  # fmt: skip
        async with batcher.working():
            with pytest.raises(RuntimeError, match="the model failed"):
                await asyncio.wait_for(batcher.run(lambda: (np.zeros((1, 1)), None)), 10)
            with pytest.raises(RuntimeError, match="not an error a decoder"):
                await asyncio.wait_for(batcher.run(broken), 10)
            return await asyncio.wait_for(batcher.run(lambda: (np.zeros((3, 1)), "notes")), 10)

    probs, notes = asyncio.run(scenario())
    assert probs.shape == (3, 2) and notes == "notes"
    assert calls == [1, 3], "the broken request never reached the model"

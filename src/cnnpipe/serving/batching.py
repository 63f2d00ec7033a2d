"""Concurrent requests gathered into one model call: each request's images are prepared (decoded)
and classified together in one worker thread, so the event loop only parses HTTP, and
onnxruntime runs one batch where it would have run many single images."""

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Gauge, Histogram

from cnnpipe.serving.http import RequestError

# What a request hands over: a function, run in the worker thread, that returns its images and
# anything the request wants back with their probabilities (the decoding notes).
Prepare = Callable[[], tuple[np.ndarray, Any]]
Job = tuple[Prepare, asyncio.Future]


class Batcher:
    """Requests wait in a queue of at most `max_queue` (more get 503). The worker takes up to
    `max_batch` of them, after waiting at most `window_s` for more once the first arrives, and
    classifies them in one model call; requests that arrive meanwhile make the next batch."""

    def __init__(
        self,
        classify: Callable[[np.ndarray], np.ndarray],
        max_batch: int,
        window_s: float,
        max_queue: int,
        registry: CollectorRegistry,
        observe: Callable[[np.ndarray, np.ndarray], None] | None = None,
    ) -> None:
        self.classify, self.max_batch, self.window_s = classify, max_batch, window_s
        self.max_queue = max_queue
        # Shown each call's images and probabilities, in the worker thread (the drift gauges).
        self.observe = observe
        self.pending: deque[Job] = deque()
        self.arrived: asyncio.Event  # made in the app's event loop, by `working`
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="cnnpipe-batch")
        self.batch_images = Histogram(
            "cnnpipe_batch_images",
            "Images in each model call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=registry,
        )
        self.batch_requests = Histogram(
            "cnnpipe_batch_requests",
            "Requests gathered into each model call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=registry,
        )
        # Counted up and down, not read from the queue: a function's value does not cross
        # processes (cnnpipe serve --workers).
        self.queued = Gauge(
            "cnnpipe_batch_queue", "Requests waiting for the model", registry=registry,
            multiprocess_mode="livesum",
        )  # fmt: skip

    async def run(self, prepare: Prepare) -> tuple[np.ndarray, Any]:
        """The probabilities of the images `prepare` returns, and what else it returned; its
        ValueError is raised here; RequestError 503 when the queue is full."""
        if len(self.pending) >= self.max_queue:
            raise RequestError(
                503, f"the service is busy ({self.max_queue} requests waiting): retry shortly"
            )
        future = asyncio.get_running_loop().create_future()
        self.pending.append((prepare, future))
        self.queued.inc()
        self.arrived.set()
        return await future

    @contextlib.asynccontextmanager
    async def working(self, _: object = None) -> AsyncIterator[None]:
        """The worker, for as long as the app runs (a Starlette lifespan)."""
        self.arrived = asyncio.Event()
        worker = asyncio.create_task(self.work())
        try:
            yield
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    async def work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.arrived.wait()
            self.arrived.clear()
            if not self.pending:
                continue
            await self.gather(loop.time() + self.window_s)
            jobs = [self.pending.popleft() for _ in range(min(self.max_batch, len(self.pending)))]
            self.queued.dec(len(jobs))
            outcomes = await loop.run_in_executor(self.thread, self.run_batch, jobs)
            for (_, future), outcome in zip(jobs, outcomes, strict=True):
                if future.done():  # the client went away
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
            if self.pending:
                self.arrived.set()

    async def gather(self, deadline: float) -> None:
        """Wait until `max_batch` requests are queued or `deadline` passes."""
        loop = asyncio.get_running_loop()
        while len(self.pending) < self.max_batch and (left := deadline - loop.time()) > 0:
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self.arrived.wait()

    def run_batch(self, jobs: list[Job]) -> list[Any]:
        """In the worker thread: each job's images prepared, all classified in one call. A job
        whose images could not be prepared gets its exception (ValueError: a bad image), and a
        failed model call fails every job in it; nothing raised here may stop the worker."""
        prepared: list[Any] = []
        for prepare, _ in jobs:
            try:
                prepared.append(prepare())
            except Exception as failure:  # the request's own answer: 400 for a ValueError
                prepared.append(failure)
        good = [p for p in prepared if not isinstance(p, Exception)]
        if not good:
            return prepared
        try:
            images = np.concatenate([images for images, _ in good])
            probs = self.classify(images)
        except Exception as failure:  # onnxruntime raises its own untyped exceptions
            return [p if isinstance(p, Exception) else failure for p in prepared]
        if self.observe:
            self.observe(images, probs)
        self.batch_images.observe(len(images))
        self.batch_requests.observe(len(good))
        outcomes, start = [], 0
        for p in prepared:
            if isinstance(p, Exception):
                outcomes.append(p)
                continue
            count = len(p[0])
            outcomes.append((probs[start : start + count], p[1]))
            start += count
        return outcomes

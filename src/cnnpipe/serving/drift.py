"""The service's drift gauges: `cnnpipe_drift_<signal>` on /metrics is the population stability
index of the last --drift-window answered images against the served file's reference
(cnnpipe/data/drift.py). The processes of `--workers` share one window, in a file beside
their metrics, so the value is one per service, whichever worker answers /metrics."""

import contextlib
import fcntl
import mmap
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cnnpipe.data import drift

COLUMNS = len(drift.SIGNALS)
# Where the processes of `--workers` keep their metrics (serving/app.py: registries).
SHARED = "PROMETHEUS_MULTIPROC_DIR"


class Window:
    """The signals of the last `size` answered images: a count, then `size` rows written in turn,
    in memory for one process, in a file that every worker maps for several."""

    def __init__(self, size: int) -> None:
        self.size = size
        nbytes = 8 + size * COLUMNS * 4
        self.thread_lock = threading.Lock()
        self.file = None
        if folder := os.environ.get(SHARED):
            self.file = os.open(Path(folder) / "drift-window", os.O_RDWR | os.O_CREAT, 0o600)
            with self.locked():
                if os.fstat(self.file).st_size < nbytes:
                    os.ftruncate(self.file, nbytes)
        self.memory = mmap.mmap(-1 if self.file is None else self.file, nbytes)
        self.count = np.frombuffer(self.memory, np.int64, 1)
        self.rows = np.frombuffer(self.memory, np.float32, size * COLUMNS, 8).reshape(size, -1)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Against this process's other threads and, through the file, the other workers."""
        with self.thread_lock:
            if self.file is None:
                yield
                return
            fcntl.flock(self.file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self.file, fcntl.LOCK_UN)

    def add(self, rows: np.ndarray) -> None:
        rows = rows[-self.size :]
        with self.locked():
            start = int(self.count[0])
            self.rows[(start + np.arange(len(rows))) % self.size] = rows
            self.count[0] = start + len(rows)

    def latest(self) -> np.ndarray:
        with self.locked():
            return self.rows[: min(int(self.count[0]), self.size)].copy()

    def clear(self) -> None:
        """Forget what an earlier model answered: its classes and confidences are not the new
        one's."""
        with self.locked():
            self.count[0] = 0


class DriftGauges(Collector):
    """The gauges, computed when /metrics is read, against `reference`, the served file's; none
    for a file without one."""

    def __init__(self, window: Window, reference: dict | None) -> None:
        self.window, self.reference = window, reference

    def follow(self, reference: dict | None) -> None:
        """A new model serves: compare its answers, from now on, with its own reference."""
        self.reference = reference
        self.window.clear()

    def observe(self, images: np.ndarray, probabilities: np.ndarray) -> None:
        """One model call's images and answers (the batcher's thread)."""
        self.window.add(drift.values(images, probabilities))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        reference = self.reference
        if reference is None:
            return
        rows = self.window.latest()
        yield GaugeMetricFamily(
            "cnnpipe_drift_window_images",
            "Answered images the drift gauges compare with the reference (at most --drift-window)",
            value=len(rows),
        )
        if not len(rows):
            return
        for name, value in drift.compare(reference, rows).items():
            yield GaugeMetricFamily(
                f"cnnpipe_drift_{name}",
                f"Population stability index of {name.replace('_', ' ')} over the last answered "
                "images against the test split (under 0.1 stable, over 0.25 a major shift)",
                value=value,
            )

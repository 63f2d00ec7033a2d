"""What the service keeps of what it answers (`cnnpipe serve --capture DIR`): a random share of
every answered image ("sampled"), and every other one whose top probability is under a threshold
("unsure"), for review, retraining and drift reports. Off unless asked for: the images are users'
data, kept as received (a JPEG keeps its EXIF, GPS included).

DIR holds each image once, named by the sha256 of its bytes (`<digest>.<ext>`; a v2 tensor as
PNG), and captured.jsonl, one line per image: its digest, why it was kept, when, the route, the
model's name, version and file digest, and the probability of each class; models/ describes each
model that answered, for `cnnpipe monitor`. A thread writes them, so no
request waits on the disk; the processes of `--workers` share the folder through a lock file, and
so its size limit. A folder that cannot be written, or is full, costs answers nothing: one log
line, and `cnnpipe_capture_dropped_total` counts what was not kept."""

import contextlib
import fcntl
import hashlib
import io
import json
import os
import queue
import random
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from prometheus_client import CollectorRegistry, Counter

LINES = "captured.jsonl"
# What `cnnpipe monitor` compares the sampled images with: each answering model's description.
DESCRIPTIONS = "models"
# The bytes DIR holds, kept under the lock so that every worker stops at the same limit.
TOTAL = ".captured-bytes"
LOCK = ".lock"
# File name endings by Pillow's format name, where they differ from it in lower case.
ENDINGS = {"JPEG": "jpg", "TIFF": "tif"}


@dataclass(frozen=True)
class Settings:
    """`cnnpipe serve`'s --capture options."""

    folder: str
    unsure_below: float = 0.5
    sample_share: float = 0.01
    max_mb: float = 1024


@dataclass(frozen=True)
class Kept:
    """One image to write: as received (bytes) or as a decoded tensor, and why it is kept."""

    data: bytes | np.ndarray
    probabilities: np.ndarray
    reason: str
    route: str
    time: float


def encoded(data: bytes | np.ndarray) -> tuple[bytes, str]:
    """The bytes to keep and their file ending: a received file as it came, a tensor as PNG."""
    if isinstance(data, np.ndarray):
        out = io.BytesIO()
        Image.fromarray(data).save(out, format="PNG")
        return out.getvalue(), "png"
    with Image.open(io.BytesIO(data)) as image:
        kind = image.format or "bin"
    return data, ENDINGS.get(kind, kind.lower())


class Capture:
    """Decides in the request what to keep (`offer`, which never blocks) and writes it in a
    thread of its own."""

    def __init__(
        self, settings: Settings, model: dict, class_names: list[str], registry: CollectorRegistry
    ) -> None:
        self.settings, self.class_names = settings, class_names
        self.model = {k: model.get(k) for k in ("name", "version", "sha256")}
        self.folder = Path(settings.folder)
        self.max_bytes = int(settings.max_mb * (1 << 20))
        self.kept = Counter(
            "cnnpipe_captured", "Answered images kept by --capture", ["reason"], registry=registry
        )
        self.dropped = Counter(
            "cnnpipe_capture_dropped",
            "Images --capture would have kept but did not: the folder full (limit), not writable "
            "(error), or the writer behind (busy)",
            ["reason"],
            registry=registry,
        )
        self.said: set[str] = set()
        # The digests this process has kept (or found kept), so that a repeated image is not
        # queued again; forgotten past a million, when DIR itself still tells.
        self.written: set[bytes] = set()
        self.random = random.Random()
        self.queue: queue.Queue[Kept | None] = queue.Queue(maxsize=1024)
        self.thread = threading.Thread(target=self.work, name="capture", daemon=True)
        self.thread.start()

    def describe(self, size: tuple[int, int], reference: dict | None) -> None:
        """Say in DIR/models/<sha256>.json what `cnnpipe monitor` needs of the model that answers
        from now on: its classes, input size and drift reference."""
        path = self.folder / DESCRIPTIONS / f"{self.model['sha256']}.json"
        body = {**self.model, "class_names": self.class_names, "size": list(size),
                "drift_reference": reference}  # fmt: skip
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(body))
            os.replace(partial, path)
        except OSError as failure:
            partial.unlink(missing_ok=True)
            self.say_unwritable(failure)

    def offer(
        self, images: list[bytes | np.ndarray], probabilities: np.ndarray, route: str
    ) -> None:
        """Queue the answered images that are kept: a random share of all, and the other unsure
        ones."""
        now = time.time()
        for data, probs in zip(images, probabilities, strict=True):
            # Drawn first, from every answer, sure or not: the sampled images are then a fair
            # sample of what the service meets, which `cnnpipe monitor` compares with the test
            # split. Drawn from the sure ones only, they would all look confident.
            if self.random.random() < self.settings.sample_share:
                reason = "sampled"
            elif probs.max() < self.settings.unsure_below:
                reason = "unsure"
            else:
                continue
            # An image this process kept already costs the request a hash, not a write.
            if isinstance(data, bytes) and hashlib.sha256(data).digest() in self.written:
                continue
            try:
                self.queue.put_nowait(Kept(data, probs, reason, route, now))
            except queue.Full:
                self.dropped.labels("busy").inc()

    def close(self, timeout_s: float = 10) -> None:
        """Write what is queued, then stop the thread."""
        self.queue.put(None)
        self.thread.join(timeout_s)

    def work(self) -> None:
        while (kept := self.queue.get()) is not None:
            try:
                self.write(kept)
            except OSError as failure:
                self.dropped.labels("error").inc()
                self.say_unwritable(failure)

    def write(self, kept: Kept) -> None:
        data, ending = encoded(kept.data)
        hashed = hashlib.sha256(data)
        if len(self.written) > 1_000_000:
            self.written.clear()
        digest = hashed.hexdigest()
        path = self.folder / f"{digest}.{ending}"
        record = {
            "digest": digest,
            "file": path.name,
            "reason": kept.reason,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(kept.time)),
            "route": kept.route,
            "model": self.model,
            "probabilities": dict(zip(self.class_names, kept.probabilities.tolist(), strict=True)),
        }
        line = (json.dumps(record) + "\n").encode()
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.locked():
            if path.exists():
                self.written.add(hashed.digest())
                return  # kept already, with its line
            total = self.total()
            if total + len(data) + len(line) > self.max_bytes:
                self.dropped.labels("limit").inc()
                self.say_once(
                    "limit",
                    f"capture: stopped, {self.folder} holds {total / (1 << 20):.1f} MB and "
                    f"--capture-mb is {self.settings.max_mb:g}; answers go on",
                )
                return
            partial = self.folder / f".{path.name}.partial"
            try:
                partial.write_bytes(data)
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
            with open(self.folder / LINES, "ab") as lines:
                end = lines.tell()
                try:
                    lines.write(line)
                    lines.flush()
                except OSError:
                    # No torn line, and no image without its line (it would never get one).
                    lines.truncate(end)
                    path.unlink()
                    raise
            (self.folder / TOTAL).write_text(str(total + len(data) + len(line)))
        self.written.add(hashed.digest())
        self.kept.labels(kept.reason).inc()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with open(self.folder / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def total(self) -> int:
        """The bytes the folder's images and lines take, as counted by every worker."""
        try:
            return int((self.folder / TOTAL).read_text())
        except (FileNotFoundError, ValueError):
            return sum(p.stat().st_size for p in self.folder.iterdir() if p.name[0] != ".")

    def say_unwritable(self, failure: OSError) -> None:
        self.say_once(
            f"error {failure.errno}",
            f"capture: cannot write to {self.folder} ({failure.strerror}); answers go on, "
            "their images are not kept",
        )

    def say_once(self, kind: str, message: str) -> None:
        if kind not in self.said:
            self.said.add(kind)
            print(message, file=sys.stderr, flush=True)

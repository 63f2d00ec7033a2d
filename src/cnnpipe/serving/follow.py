"""A service of models:/NAME@ALIAS follows its alias. A thread of the process that started the
service asks the registry which version the alias points at every --alias-check-s seconds; when
it moves, the thread downloads that version and writes its file's path into a small pointer file.
Each worker (app.py) watches the pointer and swaps the model in between two batches, so the
workers never import MLflow and no request fails. A version that does not load or would answer
other classes or take another size is not swapped in, and a registry that cannot be reached is
not followed: each costs one log line, and the old version serves on."""

import json
import os
import sys
import threading
from pathlib import Path

from cnnpipe import PipelineError
from cnnpipe.serving.onnx_model import OnnxModel, checked_model


def write_pointer(pointer: Path, model_path: str, registered: dict, refused: str = "") -> None:
    """Point the workers at `model_path`, atomically: a worker reads the old pointer or this. A
    `refused` version is only counted by the workers, not loaded."""
    partial = pointer.with_name(f".{pointer.name}.partial")
    body = {"path": model_path, "registered": registered, "refused": refused}
    partial.write_text(json.dumps(body))
    os.replace(partial, pointer)


def read_pointer(pointer: Path) -> tuple[str, dict, str] | None:
    try:
        found = json.loads(pointer.read_text())
        return found["path"], found["registered"], found["refused"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Follower(threading.Thread):
    """Checks `uri`'s alias every `interval_s` seconds and points the workers at a new version
    that fits the one they serve (the file at `path`): the same classes and input size."""

    def __init__(
        self, uri: str, registered: dict, path: str, pointer: Path, interval_s: float
    ) -> None:
        super().__init__(name="follow-alias", daemon=True)
        self.uri, self.pointer, self.interval_s = uri, pointer, interval_s
        # The version the alias pointed at when last asked, and the one the workers serve.
        self.seen = self.serving = registered["version"]
        self.alias = registered["alias"]
        first = OnnxModel.load(path)
        self.fits = (first.class_names, first.size)
        self.failing = False
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            self.check()

    def stop(self) -> None:
        self.stopped.set()

    def check(self) -> None:
        try:
            self.follow()
        # Whatever the store raised (its client's, the network's, the database's), the thread
        # must live on: the service keeps the version it has and checks again.
        except Exception as failure:  # noqa: BLE001
            if not self.failing:
                reason = str(failure).splitlines()[0] if str(failure) else type(failure).__name__
                say(
                    f"cannot check {self.uri} ({reason}); version {self.serving} serves on, "
                    f"checked again every {self.interval_s:g} s"
                )
            self.failing = True
            return
        if self.failing:
            say(f"{self.uri} checked again: version {self.serving} serves")
            self.failing = False

    def follow(self) -> None:
        from cnnpipe.tracking.registry import fetch_registered, resolve

        found = resolve(self.uri)
        if found["version"] == self.seen:
            return
        path, found = fetch_registered(f"models:/{found['name']}/{found['version']}")
        found = {**found, "alias": self.alias}
        version, self.seen = found["version"], found["version"]
        if problem := self.unfit(path):
            say(f"version {version} not swapped in: {problem}; version {self.serving} serves on")
            write_pointer(self.pointer, path, found, refused=problem)
            return
        write_pointer(self.pointer, path, found)
        say(f"{self.uri} moved to version {version}: the workers swap it in")
        self.serving = version

    def unfit(self, path: str) -> str | None:
        """Why the model at `path` cannot take the served one's place, or None."""
        try:
            model = checked_model(path)
        except PipelineError as problem:
            return str(problem)
        if (model.class_names, model.size) != self.fits:
            return f"its classes or input size differ from version {self.serving}'s"
        return None


def say(line: str) -> None:
    print(f"cnnpipe serve: {line}", file=sys.stderr, flush=True)

"""Ports, HTTP checks and waits, each wait with a deadline: for the tests, the benches,
tools/local_cluster.py, and a stage asking whether its MLflow server is up."""

import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str, timeout_s: float = 2) -> bool:
    """Whether `url` answers now with a status below 400."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_until(what: str, ready: Callable[[], bool], deadline_s: float) -> None:
    """Poll `ready` until it is true; TimeoutError naming `what` once `deadline_s` have passed."""
    deadline = time.monotonic() + deadline_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} was not ready within {deadline_s:g} s")
        time.sleep(0.3)


def wait_for_http(url: str, process: subprocess.Popen, what: str, deadline_s: float = 120) -> None:
    """Wait until `url` answers; RuntimeError if `process` (the server) exits first, with its
    stderr when that is a pipe, TimeoutError once the deadline passes."""

    def up() -> bool:
        if answers(url):
            return True
        if process.poll() is not None:
            said = process.stderr.read().decode()[-2000:] if process.stderr else ""
            raise RuntimeError(f"{what} exited before answering {url}\n{said}")
        return False

    wait_until(f"{what} at {url}", up, deadline_s)

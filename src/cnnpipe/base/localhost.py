"""Ports and waits on this machine, each wait with a deadline: for the tests, the benches and
tools/local_cluster.py."""

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

    def answers() -> bool:
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except OSError:
            if process.poll() is not None:
                said = process.stderr.read().decode()[-2000:] if process.stderr else ""
                raise RuntimeError(f"{what} exited before answering {url}\n{said}") from None
            return False

    wait_until(f"{what} at {url}", answers, deadline_s)

"""Which process owns a run or a temporary file, and whether it still lives: a process is its
id and its start time, since ids are reused."""

import socket

import psutil


def me() -> tuple[str, int, float]:
    """This machine's name, this process's id and its start time."""
    process = psutil.Process()
    return socket.gethostname(), process.pid, process.create_time()


def alive(pid: int, started: float) -> bool:
    """Whether process `pid` of this machine runs and is the one that started at `started`."""
    try:
        return abs(psutil.Process(pid).create_time() - started) < 0.01
    except (psutil.Error, ValueError):
        return False

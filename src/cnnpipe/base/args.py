"""Command lines: argparse that answers bad input in one line, and the number types it checks."""

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line that names the command and points at --help."""

    def error(self, message: str) -> NoReturn:
        sys.exit(f"{self.prog}: error: {message} (see {self.prog} --help)")


def number(kind: type, low: float, high: float | None = None) -> Callable[[str], int | float]:
    """An argparse type: a `kind` (int or float) of at least `low` (and at most `high`)."""
    word = "a whole number" if kind is int else "a number"
    bounds = f">= {low:g}" if high is None else f"from {low:g} to {high:g}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {word}") from None
        # NaN compares false with everything, so it fails the bounds too.
        if not (value >= low and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"{text} is not {bounds}")
        return value

    parse.__name__ = word
    return parse


COUNT = number(int, 1)
SECONDS = number(float, 0.001, 86_400)
MILLISECONDS = number(float, 0, 60_000)
MEGABYTES = number(float, 0.001, 10_000)
PORT = number(int, 0, 65_535)
SHARE = number(float, 0, 1)
# Seconds between two checks; 0: never.
PERIOD = number(float, 0, 86_400)

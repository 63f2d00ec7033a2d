"""Write outputs under a temporary name so that a crash never leaves a half-written file, and
remove the temporary files of processes that died before they could."""

import contextlib
import ctypes
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from cnnpipe.base import processes

# The output being written now: a full disk is reported against it, not against the
# temporary file some library wrote first (/tmp/tmp...).
writing: Path | None = None


def partial_name(name: str) -> str:
    """A temporary name for `name` that says which process owns it (PARTIAL)."""
    _, pid, started = processes.me()
    return f".{name}.partial-{pid}-{started:.2f}"


PARTIAL = re.compile(r"^\..*\.partial-(\d+)-(\d+\.\d+)")


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds."""
    global writing
    path = writing = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the suffix: writers such as matplotlib pick the format from it.
    tmp = path.with_name(partial_name(path.stem) + path.suffix)
    try:
        yield tmp
        os.replace(tmp, path)
        writing = None
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: Path | str) -> Iterator[Path]:
    """Yield a new folder beside `path`; it replaces `path` only if the block succeeds, and is
    removed otherwise: a failure keeps the previous folder as it was."""
    global writing
    path = writing = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=partial_name(path.name) + "-"))
    try:
        yield tmp
        swap(tmp, path)
        writing = None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap(new: Path, path: Path) -> None:
    """Put folder `new` in the place of `path` in one step, where the kernel can (Linux's
    renameat2 exchange): a kill at any moment leaves one of the two whole at `path`. The
    previous folder may end up at `new`, for the caller to remove."""
    if path.exists():
        libc = ctypes.CDLL(None, use_errno=True)
        at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
        renameat2 = getattr(libc, "renameat2", None)
        if renameat2 and renameat2(at_cwd, bytes(new), at_cwd, bytes(path), exchange) == 0:
            return
        # Elsewhere two renames: a kill between them leaves no folder at `path`.
        old = new.with_name(new.name + "-old")
        path.rename(old)
        new.rename(path)
        shutil.rmtree(old)
    else:
        new.rename(path)


def remove_leftovers(roots: Iterable[Path | str]) -> list[Path]:
    """Remove the temporary files and folders under `roots` whose process is dead (killed
    before it could); those of live processes (queued experiments, sweeps) stay. Returns what
    was removed."""
    found = sorted(path for root in map(Path, roots) for path in root.glob("**/.*.partial-*"))
    removed = []
    for path in found:  # parents before what they hold: listed first, then walked
        owner = PARTIAL.match(path.name)
        if not owner or not path.exists() or processes.alive(int(owner[1]), float(owner[2])):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path)
    return removed

"""Image files decoded once, on all cores, into the rows of the prepared array; a file whose size,
mtime or bytes did not change since the last preparation keeps its decoded row instead."""

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cnnpipe.data.folder import Entry
from cnnpipe.data.images import decode
from cnnpipe.data.prepared import Prepared

# Files per task: large enough that a worker's answer outweighs the cost of sending it, small
# enough that a task's images stay within CHUNK_BYTES.
CHUNK = 64
CHUNK_BYTES = 64 << 20
# Rows copied at once from one array into another.
BLOCK_BYTES = 256 << 20


@dataclass
class Decoded:
    """Per entry: its digest, or the reason it could not be read; and how many were decoded."""

    digests: list[str | None]
    errors: dict[int, str]
    decoded: int


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def row_bytes(size: int) -> int:
    return size * size * 3


def chunk_files(size: int) -> int:
    return max(1, min(CHUNK, CHUNK_BYTES // row_bytes(size)))


def block_rows(size: int) -> int:
    return max(1, BLOCK_BYTES // row_bytes(size))


def footprint(images: int, size: int, workers: int) -> tuple[int, int]:
    """(memory, disk) in bytes that preparing `images` at `size` needs: each worker's task of
    images and its copy on the way back, and a block of rows being copied; the arrays on disk."""
    task, block = min(chunk_files(size), images), min(block_rows(size), images)
    return (2 * workers * task + block) * row_bytes(size), images * row_bytes(size)


def decode_chunk(
    root: str, paths: list[str], size: int
) -> list[tuple[str, np.ndarray | None, str | None]]:
    """(digest, pixels or None, reason or None) for each file: run in a worker process."""
    out = []
    for path in paths:
        try:
            data = (Path(root) / path).read_bytes()
            pixels, _ = decode(data, (size, size))
            out.append((digest(data), pixels, None))
        except (OSError, ValueError) as error:
            out.append(("", None, str(error)))
    return out


def reusable(entries: list[Entry], previous: Prepared | None, size: int) -> dict[int, int]:
    """Entry index -> row of `previous` for files whose size and mtime are unchanged."""
    if previous is None or previous.manifest.image_size != size:
        return {}
    old = {f["path"]: (row, f) for row, f in enumerate(previous.manifest.files)}
    found = {}
    for i, e in enumerate(entries):
        if e.path in old:
            row, f = old[e.path]
            if (f.get("size"), f.get("mtime_ns")) == (e.size, e.mtime_ns):
                found[i] = row
    return found


def decode_entries(
    root: Path,
    entries: list[Entry],
    size: int,
    out: np.ndarray,
    previous: Prepared | None,
    workers: int | None = None,
) -> Decoded:
    """Fill row i of `out` (uint8 (N, size, size, 3)) with entry i: copied from `previous` where
    the file did not change, else decoded in `workers` processes (all cores by default)."""
    reuse = reusable(entries, previous, size)
    digests: list[str | None] = [None] * len(entries)
    if reuse:
        pairs = sorted(reuse.items(), key=lambda p: p[1])
        block = block_rows(size)
        for start in range(0, len(pairs), block):
            part = pairs[start : start + block]
            out[[i for i, _ in part]] = previous.images.take(np.array([r for _, r in part]))
        for i, row in reuse.items():
            digests[i] = previous.manifest.files[row]["sha256"]
    todo = [i for i in range(len(entries)) if i not in reuse]
    errors: dict[int, str] = {}
    chunk = chunk_files(size)
    chunks = [todo[k : k + chunk] for k in range(0, len(todo), chunk)]
    workers = min(workers or os.cpu_count() or 1, max(len(chunks), 1))
    with (
        ProcessPoolExecutor(workers) as pool,
        tqdm(total=len(todo), unit="img", desc="decode", disable=not todo) as bar,
    ):
        jobs = [
            (chunk, pool.submit(decode_chunk, str(root), [entries[i].path for i in chunk], size))
            for chunk in chunks
        ]
        for chunk, job in jobs:
            for i, (sha, pixels, reason) in zip(chunk, job.result(), strict=True):
                if reason:
                    errors[i] = reason
                else:
                    out[i], digests[i] = pixels, sha
            bar.update(len(chunk))
    return Decoded(digests, errors, len(todo))

"""The prepare stage on a folder of images: a full decode against an incremental one after a few
files changed, timed in one run, and the decode rate.

usage: python bench/prepare.py --source FOLDER [--changed 20] [--image-size 32]
       python bench/prepare.py --tiny       # 300 generated images: the CI smoke test

A folder is laid out as <class>/<image> or train|test/<class>/<image>. The incremental run edits
`--changed` images and adds as many new ones in a copy of the folder, then prepares again over
the full run's output, as `dvc repro` does after a user adds and edits a few pictures.
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from cnnpipe.base.config import compose_params
from cnnpipe.data.preparation import prepare
from cnnpipe.data.prepared import read_manifest

ROOT = Path(__file__).resolve().parents[1]


def generated(folder: Path, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.jpg", quality=90)
    return folder


def timed(data, dest: Path) -> float:
    start = time.perf_counter()
    prepare(data, dest)
    return time.perf_counter() - start


def change(folder: Path, count: int) -> None:
    """Edit `count` images (new pixels, new mtime) and add `count` new ones."""
    images = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    rng = np.random.default_rng(1)
    for k, path in enumerate(images[:: max(1, len(images) // count)][:count]):
        with Image.open(path) as image:
            size = image.size
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(
            path, format=Image.registered_extensions()[path.suffix.lower()]
        )
        Image.fromarray(pixels).save(path.with_name(f"added-{k}.png"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path)
    parser.add_argument("--changed", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if not args.tiny and not args.source:
        parser.error("give --source FOLDER, or --tiny")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = generated(work / "tiny", 100) if args.tiny else args.source
        copy = work / "images"
        shutil.copytree(source, copy)
        overrides = ["data=folder", f"data.source={copy}", f"data.image_size={args.image_size}"]
        data = OmegaConf.create(compose_params(overrides, conf_dir=ROOT / "conf")).data
        full = timed(data, work / "prepared")
        n = len(read_manifest(work / "prepared").files)
        change(copy, args.changed)
        again = timed(data, work / "prepared")
        print(
            f"{os.cpu_count()} cores; full decode: {n:,} images in {full:.2f} s, "
            f"{n / full:,.0f} images/s"
        )
        print(
            f"{args.changed} edited + {args.changed} added: {again:.2f} s; full / incremental: "
            f"{full / again:.1f}x"
        )


if __name__ == "__main__":
    main()

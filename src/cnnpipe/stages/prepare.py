"""Stage `prepare`: the configured images, decoded once into the arrays every later stage reads."""

from pathlib import Path

import numpy as np

from cnnpipe.base.args import Parser
from cnnpipe.base.config import load_params, output_roots
from cnnpipe.base.files import remove_leftovers
from cnnpipe.data.preparation import prepare


def main(argv: list[str] | None = None) -> None:
    Parser(prog="cnnpipe prepare", description=__doc__).parse_args(argv)
    cfg = load_params()
    remove_leftovers(output_roots(cfg))
    manifest = prepare(cfg.data, Path(cfg.paths.data))
    counts = np.array(list(manifest.class_counts().values()))
    print(
        f"prepared {manifest.name}: {len(manifest.files):,} images of {manifest.image_size}x"
        f"{manifest.image_size}, {len(manifest.classes)} classes ({counts.min():,} to "
        f"{counts.max():,} images each) in {cfg.paths.data}"
    )

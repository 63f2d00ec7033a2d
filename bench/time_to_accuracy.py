"""Time to accuracy: the pipeline's own train and evaluate code on real data, accuracy against time.

usage: python bench/time_to_accuracy.py [--data data/cifar-10-batches-py] [OVERRIDE ...]
       python bench/time_to_accuracy.py --tiny     # random data, seconds: the CI smoke test
Overrides are Hydra overrides of conf/ (e.g. trainer.max_epochs=30 trainer.precision=32-true).
Runs in a temporary folder without MLflow; prints validation accuracy and training time per epoch,
then test accuracy (with the configured test-time augmentation), training time and peak memory.
"""

import argparse
import pickle
import tempfile
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from cnnpipe.cifar_files import META, TEST_BATCH, TRAIN_BATCHES
from cnnpipe.config import compose_params, outputs_under
from cnnpipe.evaluate import evaluate
from cnnpipe.train import train

ROOT = Path(__file__).resolve().parents[1]


def write_random_batches(folder: Path, per_batch: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name in [*TRAIN_BATCHES, TEST_BATCH]:
        batch = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, per_batch).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (folder / META).write_bytes(pickle.dumps(meta, protocol=4))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="data/cifar-10-batches-py")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data).resolve()
        overrides = list(args.overrides)
        if args.tiny:
            data = Path(tmp) / "batches"
            write_random_batches(data, per_batch=64)
            overrides = ["trainer.max_epochs=2", "data.val_size=64", *overrides]
        cfg = OmegaConf.create(compose_params(overrides, conf_dir=ROOT / "conf"))
        cfg = outputs_under(OmegaConf.merge(cfg, {"paths": {"data": str(data)}}), tmp)
        metrics = train(cfg)
        history = (Path(cfg.paths.history)).read_text().splitlines()
        test = evaluate(cfg)

    print(f"\n{' '.join(overrides) or 'default config'}")
    print("epoch  val/acc  seconds")
    for line in history[1:]:
        row = dict(zip(history[0].split(","), line.split(","), strict=True))
        print(f"{row['epoch']:>5}  {float(row['val/acc']):7.4f}  {float(row['seconds']):7.1f}")
    print(
        f"test/acc {test['test/acc']:.4f} (tta_flip={cfg.evaluate.tta_flip}), "
        f"training {metrics['train/seconds']:.0f} s "
        f"at {metrics['train/images_per_second']:.0f} images/s, "
        f"peak memory {metrics['train/peak_rss_mb']:.0f} MB"
    )


if __name__ == "__main__":
    main()

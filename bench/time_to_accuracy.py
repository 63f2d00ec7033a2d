"""Time to accuracy: epochs and training seconds until the test accuracy, as deployed, reaches 80%,
for the previous recipe (OLD below) and the default, side by side in one run on one machine.

usage: python bench/time_to_accuracy.py [--data DIR] [--ablation] [--target 0.8] [OVERRIDE ...]
       python bench/time_to_accuracy.py --against trainer.precision=32-true   # default vs fp32
       python bench/time_to_accuracy.py --tiny     # random data, seconds: the CI smoke test
Overrides are Hydra overrides of conf/ applied to every run (e.g. trainer.precision=32-true),
except where the previous recipe sets the same key.
--against OVERRIDE (repeatable) compares the default with those overrides ("new") against the
default as it is ("old"), instead of the previous recipe against the default.
--ablation also trains the default with each trick switched off in turn (the test-time ones
only re-score the default's checkpoint) and prints the ablation table of docs/performance.md.
Runs in a temporary folder without MLflow. The test accuracy is measured after every epoch with
the weights and test-time views the checkpoint would be evaluated with; its time is not counted.
"""

import argparse
import tempfile
from itertools import accumulate
from pathlib import Path

import console
import torch
from omegaconf import DictConfig, OmegaConf

from cnnpipe.base.config import compose_params, outputs_under
from cnnpipe.data.loader import read_split
from cnnpipe.data.prepared import write_random
from cnnpipe.training.classifier import load_checkpoint
from cnnpipe.training.epoch_scoring import TestAccuracy
from cnnpipe.training.evaluation import evaluate
from cnnpipe.training.fit import train
from cnnpipe.training.inference import TorchModel, nhwc, predict_probs

ROOT = Path(__file__).resolve().parents[1]
# The default config before the current recipe (docs/performance.md, Time to accuracy).
OLD = [
    "trainer.max_epochs=35", "data.crop_padding=4", "loader.batch_size=256",
    "optim.ema_decay=null", "optim.whiten=false", "evaluate.tta.views=[image,mirror]",
]  # fmt: skip
# Each trick of the recipe and the override that switches it off; --ablation leaves out the
# tricks the config has off already.
TRICKS = {
    "crops padded by 2 pixels (off: 4)": "data.crop_padding=4",
    "batch 128 (off: 256)": "loader.batch_size=256",
    "EMA of the weights": "optim.ema_decay=null",
    "whitened first conv": "optim.whiten=false",
    "moved test-time views (off: the image and its mirror)": "evaluate.tta.views=[image,mirror]",
    "mirrored test-time views (off: the image and its moves)": (
        "evaluate.tta.views=[image,image_up_left,image_down_right]"
    ),
}
TEST_TIME = ("evaluate.tta.",)


def composed(overrides: list[str]) -> DictConfig:
    return OmegaConf.create(compose_params(overrides, conf_dir=ROOT / "conf"))


def job_config(name: str, overrides: list[str], data: Path, tmp: str) -> DictConfig:
    """conf/ with `overrides`, reading `data`, every output under tmp/name."""
    cfg = OmegaConf.merge(composed(overrides), {"paths": {"data": str(data)}})
    return outputs_under(cfg, f"{tmp}/{name}")


def run(name: str, overrides: list[str], data: Path, tmp: str, target: float) -> dict:
    cfg = job_config(name, overrides, data, tmp)
    scorer = TestAccuracy(cfg)
    train(cfg, callbacks=(scorer,))
    history = Path(cfg.paths.history).read_text().splitlines()
    rows = [dict(zip(history[0].split(","), line.split(","), strict=True)) for line in history[1:]]
    # The history's clock runs through validation, and so through the scoring.
    scoring = accumulate(r["scoring_s"] for r in scorer.rows)
    seconds = [float(r["seconds"]) - s for r, s in zip(rows, scoring, strict=True)]
    test = evaluate(cfg)["test.acc"]
    print(f"\n{name}: {' '.join(overrides) or 'default config'}")
    print("epoch  val/acc  test.acc  training s")
    accuracy = [r["acc"] for r in scorer.rows]
    for epoch, (row, acc, s) in enumerate(zip(rows, accuracy, seconds, strict=True), 1):
        print(f"{epoch:>5}  {float(row['val/acc']):7.4f}  {acc:8.4f}  {s:10.1f}")
    reached = next((e for e, acc in enumerate(accuracy, 1) if acc >= target), None)
    result = {
        "name": name,
        "cfg": cfg,
        "epochs": len(rows),
        "test.acc": test,
        "seconds": seconds[-1],
        "epochs_to_target": reached,
        "seconds_to_target": seconds[reached - 1] if reached else None,
    }
    print(
        f"test.acc {test:.4f} after {len(rows)} epochs, training {seconds[-1]:.0f} s; "
        + (
            f"{target:.0%} reached after {reached} epochs, {result['seconds_to_target']:.0f} s"
            if reached
            else f"{target:.0%} not reached"
        ),
        flush=True,
    )
    return result


def accuracy_at_budget(name: str, overrides: list[str], data: Path, tmp: str) -> float:
    """Train without scoring each epoch; the test accuracy as `evaluate` gives it."""
    cfg = job_config(name, overrides, data, tmp)
    train(cfg)
    test = evaluate(cfg)["test.acc"]
    print(f"\n{name}: {' '.join(overrides)}\ntest.acc {test:.4f}", flush=True)
    return test


def rescore(cfg: DictConfig, tta: DictConfig) -> float:
    """The test accuracy of `cfg`'s checkpoint with other test-time views."""
    images, labels = read_split(cfg, "test")
    model = TorchModel(load_checkpoint(cfg.paths.checkpoint), **tta)
    probs = predict_probs(model, nhwc(images), cfg.evaluate.batch_size)
    return float((probs.argmax(1) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--target", type=float, default=0.80)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--against", action="append", default=[], metavar="OVERRIDE")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    print(f"{console.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data).resolve()
        tiny = []
        if args.tiny:
            data = Path(tmp) / "prepared"
            write_random(data, train=320, test=64)
            tiny = ["trainer.max_epochs=2", "data.val_size=64", "loader.batch_size=64"]
        common = [*args.overrides, *tiny]
        if args.against:
            new = run("new", [*common, *args.against], data, tmp, args.target)
            old = run("old", common, data, tmp, args.target)
        else:
            new = run("new", common, data, tmp, args.target)
            # The previous recipe as it was: its own settings win over the overrides (not --tiny's).
            old = run("old", [*args.overrides, *OLD, *tiny], data, tmp, args.target)

        print(f"\nrecipe  epochs  test.acc  training s  epochs to {args.target:.0%}  seconds to it")
        for r in (old, new):
            to = r["epochs_to_target"] or "-"
            s = f"{r['seconds_to_target']:.0f}" if r["epochs_to_target"] else "-"
            print(
                f"{r['name']:<6}  {r['epochs']:>6}  {r['test.acc']:8.4f}  {r['seconds']:10.0f}  "
                f"{to:>12}  {s:>13}"
            )
        if old["epochs_to_target"] and new["epochs_to_target"]:
            print(
                f"new / old: {new['epochs_to_target'] / old['epochs_to_target']:.2f}x the epochs, "
                f"{new['seconds_to_target'] / old['seconds_to_target']:.2f}x the seconds"
            )
        if not args.ablation:
            return
        rows = []
        default = composed(common)
        for trick, off in TRICKS.items():
            if composed([*common, off]) == default:
                continue
            if off.startswith(TEST_TIME):
                acc = rescore(new["cfg"], composed([*common, off]).evaluate.tta)
            else:
                acc = accuracy_at_budget(f"no-{off.split('=')[0]}", [*common, off], data, tmp)
            rows.append((trick, off, acc))
    budget = f"{new['epochs']} epochs"
    print(f"\n| trick | switched off by | test.acc at {budget} without it | it gives |")
    print("|---|---|---|---|")
    print(f"| all on | | {new['test.acc']:.2%} | |")
    for trick, off, acc in rows:
        print(f"| {trick} | `{off}` | {acc:.2%} | {new['test.acc'] - acc:+.2%} |")


if __name__ == "__main__":
    console.run(main)

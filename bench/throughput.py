"""Training throughput of one model three ways, measured side by side in one process.

1. plain:    a hand-written PyTorch loop over the project's in-memory, batch-augmented data.
2. project:  the project's Lightning loop (`cnnpipe train`), same model, data, batch and precision.
3. tutorial: the recipe most tutorials use: per-image PIL transforms (RandomCrop, RandomHorizontal-
             Flip, ToTensor, Normalize) in a DataLoader with 2 workers, fp32, NCHW.

usage: python bench/throughput.py [--data data/cifar-10-batches-py] [OVERRIDE ...]
       python bench/throughput.py --tiny          # random data, seconds: the CI smoke test
Overrides are Hydra overrides of conf/ (e.g. trainer.precision=32-true loader.batch_size=512).
The three are run in turn, `--repeats` times, and the median of each is compared.
"""

import argparse
import statistics
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torchvision import transforms

from cnnpipe.config import compose_params
from cnnpipe.data import BatchLoader, read_split
from cnnpipe.train import build_module, build_trainer

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [str(i) for i in range(10)]


def forever(loader: Iterable) -> Iterator:
    while True:
        yield from loader


def project_loader(cfg: DictConfig, images: torch.Tensor, labels: torch.Tensor) -> BatchLoader:
    return BatchLoader(
        images,
        labels,
        cfg.loader.batch_size,
        shuffle=True,
        crop_padding=cfg.data.crop_padding,
        flip=cfg.data.flip,
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def timed_steps(step, batches: Iterator, steps: int, warmup: int) -> float:
    """images/s of `step(images, labels)` over `steps` batches after `warmup` untimed ones."""
    for _ in range(warmup):
        step(*next(batches))
    seen, start = 0, time.perf_counter()
    for _ in range(steps):
        images, labels = next(batches)
        step(images, labels)
        seen += len(labels)
    return seen / (time.perf_counter() - start)


def plain_loop(cfg: DictConfig, images, labels, steps: int, warmup: int) -> float:
    """Forward, loss, backward, optimizer and schedule steps; nothing else."""
    module = build_module(cfg, CLASSES).train()
    optimizer = torch.optim.AdamW(
        module.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.optim.lr, steps + warmup)
    bf16 = cfg.trainer.precision.startswith("bf16")

    def step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(module(x), y, label_smoothing=cfg.optim.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

    return timed_steps(step, forever(project_loader(cfg, images, labels)), steps, warmup)


class StepClock(pl.Callback):
    """Times the training batches after the first `warmup` ones."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.seen, self.start, self.end = warmup, 0, 0.0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.warmup:
            self.seen += len(batch[1])
            self.end = time.perf_counter()


def project_loop(cfg: DictConfig, images, labels, steps: int, warmup: int) -> float:
    """The project's Lightning loop as `cnnpipe train` builds it, validation left out."""
    clock = StepClock(warmup)
    trainer = build_trainer(
        cfg, logger=False, callbacks=[clock], max_steps=steps + warmup, limit_val_batches=0
    )
    trainer.fit(build_module(cfg, CLASSES), train_dataloaders=project_loader(cfg, images, labels))
    return clock.seen / (clock.end - clock.start)


class PILImages(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.images = images.permute(0, 2, 3, 1).numpy()
        self.labels, self.transform = labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def tutorial_loop(cfg: DictConfig, images, labels, steps: int, warmup: int) -> float:
    """Per-image PIL transforms in DataLoader workers, fp32 NCHW: the usual tutorial."""
    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=cfg.data.crop_padding),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(cfg.data.mean, cfg.data.std),
        ]
    )
    dataset = PILImages(images, labels, transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.loader.batch_size, shuffle=True, num_workers=2
    )
    net = build_module(OmegaConf.merge(cfg, {"loader": {"channels_last": False}}), CLASSES).net
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )

    def step(x, y):
        loss = F.cross_entropy(net(x), y, label_smoothing=cfg.optim.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return timed_steps(step, forever(loader), steps, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="data/cifar-10-batches-py")
    parser.add_argument("--tiny", action="store_true", help="random data and a few steps")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    # The whitening initialisation runs once before the first step (about a second), not per
    # step, and needs the datamodule; the weight averaging after each step is measured.
    overrides = ["optim.whiten=false", *args.overrides]
    cfg = OmegaConf.create(compose_params(overrides, conf_dir=ROOT / "conf"))
    steps, repeats, warmup = args.steps, args.repeats, 5
    if args.tiny:
        images = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8)
        labels = torch.randint(0, 10, (512,))
        cfg.loader.batch_size, steps, repeats, warmup = 64, 4, 1, 1
    else:
        images, labels = read_split(Path(args.data), "train")

    loops = {"plain": plain_loop, "project": project_loop, "tutorial": tutorial_loop}
    runs = {name: [] for name in loops}
    for _ in range(repeats):
        # In turn, so that a change in machine load hits all three alike.
        for name, loop in loops.items():
            runs[name].append(loop(cfg, images, labels, steps, warmup))
    rate = {name: statistics.median(values) for name, values in runs.items()}

    print(
        f"\nmodel {cfg.model._target_}, batch {cfg.loader.batch_size}, "
        f"precision {cfg.trainer.precision}, channels_last {cfg.loader.channels_last}, "
        f"ema_decay {cfg.optim.ema_decay}, "
        f"{torch.get_num_threads()} threads, "
        f"{steps} timed steps x {repeats} repeats (median)"
    )
    for name, value in rate.items():
        each = ", ".join(f"{v:.0f}" for v in runs[name])
        print(f"{name:>9}: {value:8.0f} images/s   (runs: {each})")
    print(f"project / plain    = {rate['project'] / rate['plain']:.3f}  (goal >= 0.95)")
    print(f"project / tutorial = {rate['project'] / rate['tutorial']:.2f}  (goal >= 3)")


if __name__ == "__main__":
    main()

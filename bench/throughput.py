"""Training throughput of one model three ways, measured side by side in one process.

1. plain:    a hand-written PyTorch loop over the project's in-memory, batch-augmented data:
             forward, loss, backward, optimizer and schedule steps, nothing else (no weight
             averaging, no metrics, no progress bar).
2. project:  the project's Lightning loop (`cnnpipe train`), same model, data, batch and precision,
             with everything the recipe does each step (the weight averaging included).
3. tutorial: the recipe most tutorials use: per-image PIL transforms (RandomCrop, RandomHorizontal-
             Flip, ToTensor, Normalize) in a DataLoader with 2 workers, fp32, NCHW.

usage: python bench/throughput.py [--data data/prepared] [OVERRIDE ...]
       python bench/throughput.py --tiny          # random data, seconds: the CI smoke test
Overrides are Hydra overrides of conf/ (e.g. trainer.precision=bf16-mixed loader.batch_size=256).

The plain and project steps alternate, one each in turn, inside one Lightning run: a shared VM's
speed drifts by up to 30% from one minute to the next, and alternating makes the drift hit both
alike, so their ratio compares steps taken at the same moments. The tutorial loop's worker
processes would compete with the other two for the cores, so it runs on its own, after them;
that is repeated `--repeats` times and the median of each is compared.
"""

import argparse
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace

import console
import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.profiler import profile, record_function
from torchvision import transforms

from cnnpipe.base.config import compose_params
from cnnpipe.data.loader import BatchLoader
from cnnpipe.data.prepared import Prepared, write_random
from cnnpipe.training import build

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [str(i) for i in range(10)]


def step_config(overrides: list[str]) -> DictConfig:
    """conf/ with `overrides`, for timing steps. The whitening initialisation runs once before
    the first step (about a second), not per step, and needs the datamodule: it is off. The
    weight averaging after each step is measured."""
    return OmegaConf.create(compose_params(["optim.whiten=false", *overrides], ROOT / "conf"))


def cifar_like(cfg: DictConfig) -> SimpleNamespace:
    """What build.module reads of a datamodule: ten classes of 32x32 images, CIFAR's statistics."""
    return SimpleNamespace(
        class_names=CLASSES,
        mean=cfg.data.mean,
        std=cfg.data.std,
        image_size=32,
        channels_last=cfg.loader.channels_last,
    )


def forever(loader: Iterable) -> Iterator:
    while True:
        yield from loader


def project_loader(cfg: DictConfig, prepared: Prepared) -> BatchLoader:
    """The train stage's loader: batches read from the prepared arrays on disk."""
    rows = np.arange(len(prepared.labels))
    return BatchLoader(
        prepared.images,
        torch.from_numpy(prepared.labels),
        rows,
        cfg.loader.batch_size,
        shuffle=True,
        crop_padding=cfg.data.crop_padding,
        flip=cfg.data.flip,
        generator=torch.Generator().manual_seed(cfg.seed),
        channels_last=cfg.loader.channels_last,
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


def plain_step(cfg: DictConfig, module: pl.LightningModule, prepared: Prepared, total_steps: int):
    """One step of the plain loop for `module` per call, each on the next batch; returns the
    seconds it took."""
    module.train()
    optimizer = torch.optim.AdamW(
        module.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.optim.lr, total_steps)
    bf16 = build.precision(cfg).startswith("bf16")
    batches = forever(project_loader(cfg, prepared))

    def step() -> float:
        start = time.perf_counter()
        x, y = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(module(x), y, label_smoothing=cfg.optim.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        return time.perf_counter() - start

    return step


class Alternate(pl.Callback):
    """Runs one plain step before each of the project's steps, and times the two apart.

    A project step is timed from the end of the plain step to the next batch's start: all that
    Lightning does for one batch (hooks, training step, optimizer, weight averaging, progress
    bar, fetching the next batch), and nothing of the plain step.
    """

    def __init__(self, plain, warmup: int) -> None:
        self.plain_step, self.warmup = plain, warmup
        self.plain, self.project, self.end = [], [], 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        start, step = time.perf_counter(), trainer.global_step
        if step > self.warmup:
            self.project.append(start - self.end)
        plain = self.plain_step()
        if step >= self.warmup:
            self.plain.append(plain)
        self.end = time.perf_counter()


def alternate_fit(cfg: DictConfig, prepared: Prepared, alternate: Alternate, total: int) -> None:
    """The project's Lightning loop (as `cnnpipe train` builds it, validation left out) for
    `total` steps, with `alternate` running the plain steps between its own."""
    trainer = build.trainer(
        cfg, logger=False, callbacks=[alternate], max_steps=total, limit_val_batches=0
    )
    module = build.module(cfg, cifar_like(cfg))
    trainer.fit(module, train_dataloaders=project_loader(cfg, prepared))


def plain_and_project(cfg: DictConfig, prepared: Prepared, steps: int, warmup: int):
    """images/s of the plain loop and of the project's Lightning loop, their steps alternating."""
    # The first `warmup` steps of each are not timed; the last plain step has no project step
    # after it to pair with, so it is dropped.
    total = warmup + steps + 1
    plain = plain_step(cfg, build.module(cfg, cifar_like(cfg)), prepared, total)
    alternate = Alternate(plain, warmup)
    alternate_fit(cfg, prepared, alternate, total)
    plain, project = alternate.plain[:steps], alternate.project
    assert len(plain) == len(project) == steps, (len(plain), len(project))
    batch = cfg.loader.batch_size
    return batch * steps / sum(plain), batch * steps / sum(project)


class Ranges(Alternate):
    """Alternate, with each plain and each project step in a profiler range of its loop's name."""

    def __init__(self, plain, warmup: int) -> None:
        super().__init__(plain, warmup)
        self.range = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.end_project_step()
        with record_function("plain"):
            super().on_train_batch_start(trainer, module, batch, batch_idx)
        self.range = record_function("project")
        self.range.__enter__()

    def on_train_end(self, trainer, module) -> None:
        self.end_project_step()

    def end_project_step(self) -> None:
        if self.range is not None:
            self.range.__exit__(None, None, None)
            self.range = None


def quiet_profiler(**options) -> profile:
    """torch's profiler, without its backend's lines on stderr (each start and stop, and a failed
    probe for a GPU)."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    return profile(**options)


def operators_and_python(cfg: DictConfig, prepared: Prepared, steps: int) -> dict[str, tuple]:
    """Per loop, "plain" and "project": ms per step, and of those the ms spent in torch's
    operators (their own time, all aten:: events), from one profiled run of alternating steps.
    The rest is Python: the loop's code and what it calls around the operators."""
    # Two steps more than asked: a one-cycle schedule of 4 steps (--tiny) has no warm-up phase.
    total = steps + 2
    plain = plain_step(cfg, build.module(cfg, cifar_like(cfg)), prepared, total + 1)
    ranges = Ranges(plain, warmup=0)
    with quiet_profiler() as prof:
        alternate_fit(cfg, prepared, ranges, total)
    wall, operators, count = Counter(), Counter(), Counter()
    for event in prof.events():
        if event.name in ("plain", "project"):
            wall[event.name] += event.cpu_time_total
            count[event.name] += 1
            continue
        loop = event.cpu_parent
        while loop is not None and loop.name not in ("plain", "project"):
            loop = loop.cpu_parent
        if loop is not None and event.name.startswith("aten::"):
            operators[loop.name] += event.self_cpu_time_total
    return {n: (wall[n] / count[n] / 1e3, operators[n] / count[n] / 1e3) for n in wall}


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
    net = build.module(
        OmegaConf.merge(cfg, {"loader": {"channels_last": False}}), cifar_like(cfg)
    ).net
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
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--tiny", action="store_true", help="random data and a few steps")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--profile", action="store_true", help="also split each loop's step: operators, Python"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = step_config(args.overrides)
    steps, repeats, warmup = args.steps, args.repeats, 5
    data = Path(args.data)
    if args.tiny:
        data = Path(tempfile.mkdtemp()) / "prepared"
        write_random(data, train=512, test=0)
        cfg.loader.batch_size, steps, repeats, warmup = 64, 4, 1, 1
    prepared = Prepared.open(data)
    # The plain and tutorial loops hold the images in memory, as their tutorials do.
    images = torch.from_numpy(prepared.images.take(np.arange(len(prepared.labels))))
    images, labels = images.permute(0, 3, 1, 2).contiguous(), torch.from_numpy(prepared.labels)

    runs = {"plain": [], "project": [], "tutorial": []}
    for _ in range(repeats):
        plain, project = plain_and_project(cfg, prepared, steps, warmup)
        runs["plain"].append(plain)
        runs["project"].append(project)
        runs["tutorial"].append(tutorial_loop(cfg, images, labels, steps, warmup))
    rate = {name: statistics.median(values) for name, values in runs.items()}

    print(
        f"\nmodel {cfg.model._target_}, batch {cfg.loader.batch_size}, "
        f"precision {build.precision(cfg)}, channels_last {cfg.loader.channels_last}, "
        f"ema_decay {cfg.optim.ema_decay}, "
        f"{torch.get_num_threads()} threads, "
        f"{steps} timed steps each x {repeats} repeats (median)"
    )
    for name, value in rate.items():
        each = ", ".join(f"{v:.0f}" for v in runs[name])
        print(f"{name:>9}: {value:8.0f} images/s   (runs: {each})")
    print(f"project / plain    = {rate['project'] / rate['plain']:.3f}  (goal >= 0.97)")
    print(f"project / tutorial = {rate['project'] / rate['tutorial']:.2f}  (goal >= 3)")
    if not args.profile:
        return
    split = operators_and_python(cfg, prepared, steps)
    print("\none profiled run of alternating steps, ms per step:")
    print(f"{'':>9}  {'step':>6}  {'operators':>9}  {'Python':>6}")
    for name, (step, operators) in split.items():
        print(f"{name:>9}  {step:6.2f}  {operators:9.2f}  {step - operators:6.2f}")


if __name__ == "__main__":
    console.run(main)

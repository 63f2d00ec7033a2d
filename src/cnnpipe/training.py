"""The LightningModule that trains a network: uint8 images in, logits out, the network built
from primitives so that a checkpoint loads with `weights_only`; and how a config builds it and
its Trainer (`build_module`, `build_trainer`). No MLflow here: bench/gpu_check.py trains with
these on machines without it."""

import contextlib
import ctypes
import logging
import math
import pickle
import re
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EMAWeightAveraging
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cnnpipe import PipelineError
from cnnpipe.data import ImageDataModule


class LitClassifier(pl.LightningModule):
    """Normalises uint8 (N, 3, H, W) images itself, so a checkpoint alone can be exported.

    `net` is a Hydra node such as {"_target_": "cnnpipe.models.ChapterCNN"}, built for the data:
    one output per class name, inputs of `image_size` pixels square. `optim` is conf/optim's
    node: the training recipe (optimiser, schedule, loss, weight averaging, first-layer
    initialisation).
    """

    def __init__(
        self,
        net: dict,
        class_names: list[str],
        mean: list[float],
        std: list[float],
        optim: dict,
        # Checkpoints of cnnpipe before other data sets were all CIFAR-10's 32x32.
        image_size: int = 32,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = instantiate({**net, "num_classes": len(class_names), "image_size": image_size})
        # Folding the 0-255 scale into mean and std saves one pass over the batch.
        self.register_buffer("mean", 255 * torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", 255 * torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        num_classes = len(class_names)
        # A NaN loss stays NaN (the default drops it), so that a diverged run stops at its epoch's
        # end. Not "disable": that also drops the batch-size weights (torchmetrics 1.9).
        self.train_loss = MeanMetric(nan_strategy=float("nan"))
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.example_input_array = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.float() - self.mean) / self.std)

    def setup(self, stage: str) -> None:
        # Before a resumed run's checkpoint is loaded, which then replaces these weights.
        if stage == "fit" and self.hparams.optim["whiten"]:
            if self.trainer.datamodule is None:
                raise PipelineError("optim.whiten needs the training images: fit with a datamodule")
            images = self.trainer.datamodule.train_sample(1000)
            whiten_first_conv(self.net, images, self.mean, self.std)

    def configure_callbacks(self) -> list[pl.Callback]:
        hp = self.hparams.optim
        if not hp["ema_decay"]:
            return []
        # Validation, the checkpoint and so everything after training use the averaged weights.
        every = hp["ema_every_n_steps"]
        return [EMAWeightAveraging(decay=hp["ema_decay"], update_every_n_steps=every)]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(
            logits, labels, label_smoothing=self.hparams.optim["label_smoothing"]
        )
        # update() only accumulates; calling the metric would also compute a per-batch value.
        # Under DDP, compute() at the epoch's end gathers every process's shard.
        self.train_loss.update(loss.detach(), weight=len(labels))
        self.train_acc.update(logits, labels)
        # Logged on the epoch's last step only: two self.log calls every step took about 2 ms,
        # 3% of a training step of the chapter's network (bench/throughput.py). The logged
        # values are the metrics' state accumulated over the whole epoch.
        trainer = self.trainer
        if trainer.is_last_batch or trainer.global_step + 1 == trainer.max_steps:
            self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        # Checked once per epoch, not per step: nothing is saved before fit ends anyway.
        loss = self.trainer.callback_metrics.get("train/loss")
        if loss is not None and not torch.isfinite(loss):
            raise PipelineError(
                f"training diverged: train/loss is {float(loss)} in epoch {self.current_epoch + 1}"
                f"; lower optim.lr (now {self.hparams.optim['lr']})"
            )

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_acc.update(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels), prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> dict:
        hp = self.hparams.optim
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"]
        )
        steps = self.trainer.estimated_stepping_batches
        # OneCycleLR divides by zero when a phase ends where the one before it did: a warm-up of
        # exactly one step or a decay of none, which only tiny runs meet.
        warmup = hp["pct_start"] * steps
        if math.isclose(warmup, 1) or math.isclose(warmup, steps - 1):
            raise PipelineError(
                f"{steps} training steps with optim.pct_start={hp['pct_start']} give the one-cycle "
                "schedule an empty phase; change trainer.max_epochs, loader.batch_size or "
                "optim.pct_start"
            )
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=hp["lr"], total_steps=steps, pct_start=hp["pct_start"]
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@torch.no_grad()
def whiten_first_conv(
    net: nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> None:
    """Initialise the first convolution to whiten its input patches (airbench's first layer).

    Its filters become the patch covariance's leading eigenvectors, each scaled to give unit
    variance, in +/- pairs so that the ReLU after it keeps both signs. The rest of the network
    starts from decorrelated features. A network without a convolution is left as it is.
    """
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return
    # 1,000 images give 900,000 3x3 patches: far more than the covariance's 27 dimensions need.
    x = (images.float() - mean) / std
    patches = F.unfold(x, conv.kernel_size).transpose(1, 2).reshape(-1, conv.weight[0].numel())
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.double().T.cov())
    pairs = min(conv.out_channels // 2, len(eigenvalues))
    # eigh sorts ascending: the leading eigenvectors are the last columns.
    filters = (eigenvectors[:, -pairs:] / (eigenvalues[-pairs:] + 5e-4).sqrt()).T.float()
    conv.weight[: 2 * pairs] = torch.cat([filters, -filters]).view(-1, *conv.weight.shape[1:])
    if conv.bias is not None:
        conv.bias[: 2 * pairs] = 0


def load_checkpoint(path: str) -> LitClassifier:
    """Load without running pickled code: the checkpoint holds only tensors and primitives."""
    if not Path(path).is_file():
        raise PipelineError(f"no checkpoint at {path}; run `dvc repro train`")
    try:
        return LitClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, KeyError, EOFError, TypeError, pickle.UnpicklingError) as error:
        if isinstance(error, TypeError):
            reason = "it was made by an older cnnpipe, with other hyperparameters"
        elif isinstance(error, KeyError):
            reason = f"it has no {error} entry"
        elif isinstance(error, (EOFError, OSError)):
            reason = "the file is empty, truncated or unreadable"
        elif "Weights only" in str(error):
            reason = "it holds pickled objects other than tensors; refused without running them"
        else:
            reason = str(error).splitlines()[0].split(". ")[0]
        raise PipelineError(
            f"{path} is not a cnnpipe checkpoint ({reason}); run `dvc repro train`"
        ) from None


# The terminal is for people: Lightning advertises other logging services at every fit, says how
# it counts steps, and its pytree helper trips torch's deprecation of LeafSpec. None of it is
# for the person training; progress, results and errors stay.
NOISE = ("💡 Tip: ", "Loading `train_dataloader` to estimate number of stepping batches")


def _not_noise(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(NOISE)


def quiet_lightning() -> None:
    """Filter NOISE out of what training prints (once: filters are kept in a set)."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_not_noise)
    warnings.filterwarnings(
        "ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    # On a machine with SLURM's client, every run outside srun is told to prepend srun: a run
    # here is meant to run here (docs/scale-out.md says how to run under SLURM).
    warnings.filterwarnings("ignore", r"The `srun` command is available on your system")


def build_module(cfg: DictConfig, data: ImageDataModule) -> LitClassifier:
    """The classifier `cfg.model` and `cfg.optim` describe, sized and normalised for `data`."""
    module = LitClassifier(
        net=OmegaConf.to_container(cfg.model, resolve=True),
        class_names=data.class_names,
        mean=data.mean,
        std=data.std,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        image_size=data.image_size,
    )
    if cfg.loader.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def reuse_freed_memory() -> None:
    """Let glibc's malloc keep freed blocks of up to 32 MB for reuse instead of returning each to
    the kernel: a training step's activations are such blocks, and fresh pages cost a page fault
    each. glibc raises its threshold itself after a large block is freed, which reading
    CIFAR-10's 30 MB batch files used to do by chance; a memory-mapped data set frees none, and
    1 epoch then took 3 million more page faults and 7 s more system time on two cores."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)


# glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], **overrides) -> pl.Trainer:
    """`cfg.trainer` passed whole to pl.Trainer, with `cfg.callbacks` and the stage's own."""
    quiet_lightning()
    reuse_freed_memory()
    options = {
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        # No Lightning logger: EpochHistory logs per epoch, and the run's params are the recipe,
        # not a second copy of the module's hyperparameters.
        "logger": False,
        "callbacks": [*instantiate(cfg.callbacks).values(), *callbacks],
        "enable_checkpointing": False,
        "enable_model_summary": False,
        **overrides,
    }
    try:
        return pl.Trainer(**options)
    except TypeError as error:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if not unknown:
            raise
        raise PipelineError(
            f"trainer.{unknown[1]} is not an argument of pytorch_lightning.Trainer; see its "
            "documentation for the ones there are"
        ) from None
    except MisconfigurationException as error:
        raise PipelineError(f"conf/trainer: {str(error).splitlines()[0]}") from None
    except RuntimeError as error:
        # Lightning's check of an srun line, e.g. `--ntasks` where it needs `--ntasks-per-node`.
        if "SLURM" not in str(error):
            raise
        raise PipelineError(f"SLURM: {str(error).splitlines()[0]}") from None


def warn_if_bf16_is_emulated(cfg: DictConfig) -> None:
    """bf16 on a CPU without AVX-512 BF16 or AMX is emulated: on an AVX2-only AMD EPYC the
    default recipe ran 1.06 steps/s in bf16-mixed against 10.65 in 32-true."""
    on_cpu = cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available()
    bf16 = str(cfg.trainer.precision).startswith("bf16")
    if on_cpu and bf16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print(
            f"warning: this CPU has no native bf16 ({torch.backends.cpu.get_cpu_capability()}): "
            f"trainer.precision={cfg.trainer.precision} trains about 10x slower here than "
            "trainer.precision=32-true"
        )

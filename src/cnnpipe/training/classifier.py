"""The LightningModule that trains a network: uint8 images in, logits out, the network, the
optimiser and the schedule built from the recipe's Hydra nodes, so that a checkpoint holds only
primitives and loads with `weights_only`. No MLflow here: bench/gpu_check.py trains with it on
machines without it."""

import functools
import inspect
import math
import pickle
import re
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import get_class, instantiate
from pytorch_lightning.callbacks import EMAWeightAveraging
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cnnpipe import PipelineError


class LitClassifier(pl.LightningModule):
    """Normalises uint8 (N, 3, H, W) images itself, so a checkpoint alone can be exported.

    `net` is a Hydra node such as {"_target_": "cnnpipe.training.models.ChapterCNN"}, built for
    the data: one output per class name, inputs of `image_size` pixels square. `optim` is
    conf/optim's node: the training recipe (optimiser, schedule, loss, weight averaging,
    first-layer initialisation), the optimiser and schedule as partial Hydra nodes.
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
        target = moved_target(net["_target_"])
        size = {"num_classes": len(class_names), "image_size": image_size}
        self.net = instantiate({**net, "_target_": target, **size})
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
        return self.net(normalise(images, self.mean, self.std))

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
        steps = self.trainer.estimated_stepping_batches
        # The recipe's keys reach the optimiser and the schedule where they take them, so that
        # params.yaml holds each value once: lr (a one-cycle schedule's max_lr), weight_decay,
        # pct_start, and the step count, known only now.
        shared = {
            "lr": hp["lr"],
            "max_lr": hp["lr"],
            "weight_decay": hp["weight_decay"],
            "pct_start": hp["pct_start"],
            "total_steps": steps,
        }
        optimizer = built(hp["optimizer"], shared)(self.parameters())
        schedule = built(hp["scheduler"], shared)
        # OneCycleLR divides by zero when a phase ends where the one before it did: a warm-up of
        # exactly one step or a decay of none, which only tiny runs meet.
        pct_start = schedule.keywords.get("pct_start", 0)
        warmup = pct_start * steps
        if pct_start and (math.isclose(warmup, 1) or math.isclose(warmup, steps - 1)):
            raise PipelineError(
                f"{steps} training steps with optim.pct_start={pct_start} give the one-cycle "
                "schedule an empty phase; change trainer.max_epochs, loader.batch_size or "
                "optim.pct_start"
            )
        scheduler = {"scheduler": schedule(optimizer), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def moved_target(target: str) -> str:
    """A network's class path today: checkpoints made before the packages name the networks'
    module cnnpipe.models, and load as they were (tests/fixtures)."""
    return re.sub(r"^cnnpipe\.models\.", "cnnpipe.training.models.", target)


def built(node: dict, shared: dict) -> functools.partial:
    """The partial Hydra `node` (an optimiser or a schedule) with the `shared` settings its class
    takes and the node does not set itself."""
    takes = inspect.signature(get_class(node["_target_"])).parameters
    given = {key: value for key, value in shared.items() if key in takes and key not in node}
    return instantiate(node, **given)


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images to the network's input: `mean` and `std` are on the 0-255 scale."""
    return (images.float() - mean) / std


def first_conv(net: nn.Module) -> nn.Conv2d | None:
    """The network's first convolution, or None for a network without one."""
    return next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)


@torch.no_grad()
def whiten_first_conv(
    net: nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> None:
    """Initialise the first convolution to whiten its input patches (airbench's first layer).

    Its filters become the patch covariance's leading eigenvectors, each scaled to give unit
    variance, in +/- pairs so that the ReLU after it keeps both signs. The rest of the network
    starts from decorrelated features. A network without a convolution is left as it is.
    """
    conv = first_conv(net)
    if conv is None:
        return
    # 1,000 images give 900,000 3x3 patches: far more than the covariance's 27 dimensions need.
    x = normalise(images, mean, std)
    patches = F.unfold(x, conv.kernel_size).transpose(1, 2).reshape(-1, conv.weight[0].numel())
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.double().T.cov())
    pairs = min(conv.out_channels // 2, len(eigenvalues))
    # eigh sorts ascending: the leading eigenvectors are the last columns.
    filters = (eigenvectors[:, -pairs:] / (eigenvalues[-pairs:] + 5e-4).sqrt()).T.float()
    conv.weight[: 2 * pairs] = torch.cat([filters, -filters]).view(-1, *conv.weight.shape[1:])
    if conv.bias is not None:
        conv.bias[: 2 * pairs] = 0


def untrained(
    class_names: list[str],
    net: str = "cnnpipe.training.models.ChapterCNN",
    seed: int = 0,
    image_size: int = 32,
) -> LitClassifier:
    """`net` with seeded random weights, for tests and benches that need a model, not a trained
    one. Its normalisation differs per channel, as CIFAR-10's does."""
    torch.manual_seed(seed)
    return LitClassifier(
        {"_target_": net},
        class_names,
        [0.49, 0.48, 0.45],
        [0.25, 0.24, 0.26],
        optim={},
        image_size=image_size,
    )


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

"""The LightningModule: uint8 images in, logits out, with the network built from primitives."""

import math
import pickle
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from cnnpipe import PipelineError


class ImageClassifier(pl.LightningModule):
    """Normalises uint8 (N, 3, H, W) images itself, so a checkpoint alone can be exported.

    `net` is a Hydra node such as {"_target_": "cnnpipe.models.ChapterCNN", "num_classes": 10};
    `optim` is conf/optim's node: lr, weight_decay, pct_start, label_smoothing.
    """

    def __init__(
        self,
        net: dict,
        class_names: list[str],
        mean: list[float],
        std: list[float],
        optim: dict,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = instantiate(net)
        # Folding the 0-255 scale into mean and std saves one pass over the batch.
        self.register_buffer("mean", 255 * torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", 255 * torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        num_classes = len(class_names)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.example_input_array = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.float() - self.mean) / self.std)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(
            logits, labels, label_smoothing=self.hparams.optim["label_smoothing"]
        )
        # update() only accumulates; calling the metric would also compute a per-batch value.
        self.train_acc.update(logits, labels)
        # sync_dist: under DDP the epoch's loss is averaged over all processes' shards.
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
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


def untrained(
    class_names: list[str], net: str = "cnnpipe.models.ChapterCNN", seed: int = 0
) -> ImageClassifier:
    """`net` with seeded random weights, for tests and benches that need a model, not a trained
    one. Its normalisation differs per channel, as CIFAR-10's does."""
    torch.manual_seed(seed)
    return ImageClassifier(
        {"_target_": net}, class_names, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26], optim={}
    )


class Predictor(nn.Module):
    """uint8 (N, 3, H, W) images in, class probabilities out: what evaluation scores and what the
    ONNX export computes, so the accuracy reported is the accuracy deployed.

    With `tta_flip`, the probabilities are averaged with those of the mirrored images.
    """

    def __init__(self, classifier: ImageClassifier, tta_flip: bool) -> None:
        super().__init__()
        self.classifier, self.tta_flip = classifier.eval(), tta_flip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.tta_flip:
            return self.classifier(images).softmax(dim=1)
        # One pass over both views: half the per-layer overhead of two passes at small batches.
        n = images.shape[0]
        probs = self.classifier(torch.cat([images, images.flip(3)])).softmax(dim=1)
        return (probs[:n] + probs[n:]) / 2


@torch.inference_mode()
def predict_probs(predictor: Predictor, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    predictor.eval()
    # NHWC input makes oneDNN run every convolution in NHWC: twice as fast on CPU.
    return torch.cat(
        [
            predictor(images[i : i + batch_size].contiguous(memory_format=torch.channels_last))
            for i in range(0, len(images), batch_size)
        ]
    )


def load_checkpoint(path: str) -> ImageClassifier:
    """Load without running pickled code: the checkpoint holds only tensors and primitives."""
    if not Path(path).is_file():
        raise PipelineError(f"no checkpoint at {path}; run `dvc repro train`")
    try:
        return ImageClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
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

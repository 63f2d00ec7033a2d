"""The test accuracy after each epoch, for the benches that measure time to accuracy. No MLflow
here: bench/gpu_check.py uses it on machines without it."""

import time

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Timer

from cnnpipe.data.loader import read_split
from cnnpipe.training.inference import TorchModel, nhwc, predict_probs


class TestAccuracy(pl.Callback):
    """After each epoch, the test accuracy of the weights a checkpoint would hold, scored as
    `evaluate` scores the checkpoint: at the end of validation, where weight averaging has put
    the averaged weights in place, with the recipe's test-time views.

    Each of `rows` has the epoch, `acc`, and `scoring_s`, the scoring's own time; with a `timer`,
    also `seconds`, the training time so far without the scoring, printed with `say`."""

    __test__ = False  # not a pytest class

    def __init__(self, cfg: DictConfig, timer: Timer | None = None, say: bool = False) -> None:
        images, self.labels = read_split(cfg, "test")
        self.images = nhwc(images)
        self.tta, self.batch_size = dict(cfg.evaluate.tta), cfg.evaluate.batch_size
        self.timer, self.say = timer, say
        self.rows: list[dict] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        start = time.perf_counter()
        model = TorchModel(module, **self.tta)
        probs = predict_probs(model, self.images.to(module.device), self.batch_size)
        module.train()
        row = {
            "epoch": trainer.current_epoch + 1,
            "acc": float((probs.argmax(1).cpu() == self.labels).float().mean()),
            "scoring_s": time.perf_counter() - start,
        }
        if self.timer:
            scoring = sum(r["scoring_s"] for r in self.rows)
            row["seconds"] = self.timer.time_elapsed("train") - scoring
        self.rows.append(row)
        if self.say:
            print(
                f"  epoch {row['epoch']}: test accuracy {row['acc']:.2%} at {row['seconds']:.1f} s"
            )

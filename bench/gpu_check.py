"""The project on one NVIDIA GPU in one command, on a machine without network: bench/gpu_check.sh
runs this where hydra-core, MLflow and DVC may be missing (it brings hydra-core's wheels).

1. The chapter CNN with its recipe on `trainer=gpu` (bf16-mixed) on real CIFAR-10: training
   images/s, test accuracy as deployed (scored on the CPU, as the evaluate stage does), and the
   ONNX parity of that checkpoint (onnxruntime against PyTorch on the CPU, as the parity stage).
2. `model=resnet9` with RESNET9's recipe: test accuracy as deployed after every epoch (on the
   GPU, not counted in the seconds), and the training seconds until it first reaches --target.

usage: python bench/gpu_check.py --data DIR [--json OUT.json] [--resnet-epochs N] [OVERRIDE ...]
       python bench/gpu_check.py --device cpu --data DIR ...   # the same steps on the CPU (tests)
Overrides are Hydra overrides of conf/ applied to both trainings. No MLflow: this composes conf/
and trains with cnnpipe.training.build's builders directly, in a temporary folder.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Timer

from cnnpipe import PipelineError
from cnnpipe.artifact import contract
from cnnpipe.artifact.onnx_export import export_onnx
from cnnpipe.base.config import compose_params
from cnnpipe.data.loader import read_split
from cnnpipe.data.preparation import prepare
from cnnpipe.serving.onnx_model import OnnxModel
from cnnpipe.training import build
from cnnpipe.training.classifier import load_checkpoint
from cnnpipe.training.epoch_scoring import TestAccuracy
from cnnpipe.training.inference import TorchModel, nhwc, predict_probs

ROOT = Path(__file__).resolve().parents[1]
# The GPU recipes; the chapter CNN's is the project's own (conf/), on conf/trainer/gpu.yaml.
CHAPTER = ["trainer=gpu", "trainer.max_epochs=18"]
# ResNet-9 as in the CIFAR-10 speed runs: batch 512, 4-pixel crops; a small validation split.
RESNET9 = [
    "model=resnet9", "trainer=gpu", "loader.batch_size=512", "data.crop_padding=4",
    "data.val_size=1000", "optim.lr=4e-3",
]  # fmt: skip


def no_gpu_line(device: str) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():
        return (
            "gpu_check: no CUDA GPU found (torch.cuda.is_available() is False); run it on a "
            "machine with an NVIDIA GPU, or pass --device cpu for the same steps on the CPU"
        )
    return None


def compose(overrides: list[str], data: Path, folder: Path, device: str) -> DictConfig:
    # No progress bars: what this prints is read as a log, after the fact.
    quiet = ["callbacks.progress_bar.refresh_rate=0", f"paths.data={data}"]
    cfg = OmegaConf.create(compose_params([*overrides, *quiet], ROOT / "conf"))
    if device == "cpu":
        cfg.trainer.merge_with({"accelerator": "cpu", "precision": "32-true"})
    cfg.paths.checkpoint = str(folder / "model.ckpt")
    return cfg


def fit(cfg: DictConfig, folder: Path, scorer: bool = False) -> tuple[dict, TestAccuracy | None]:
    """Train `cfg` as the train stage does (no MLflow, no resume) and save its checkpoint; with
    `scorer`, score the test set after every epoch. Returns epochs, seconds and images/s."""
    data = build.datamodule(cfg)
    data.setup("fit")
    pl.seed_everything(cfg.seed, workers=True)
    module = build.module(cfg, data)
    timer = Timer()
    tracker = TestAccuracy(cfg, timer, say=True) if scorer else None
    callbacks = [timer, tracker] if tracker else [timer]
    trainer = build.trainer(cfg, callbacks, default_root_dir=folder)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(cfg.paths.checkpoint, weights_only=True)
    seconds = tracker.rows[-1]["seconds"] if tracker else timer.time_elapsed("train")
    images = data.train_size * trainer.current_epoch
    result = {"epochs": trainer.current_epoch, "seconds": seconds, "images_per_s": images / seconds}
    return result, tracker


def prepare_archive(archive: Path, dest: Path) -> Path:
    """CIFAR-10's archive at `archive` prepared into `dest`, as the prepare stage does."""
    data = compose([f"data.source={archive}"], dest, dest.parent, "cpu").data
    data.md5 = None  # a copy of the data made on the spot, checked by reading it
    prepare(data, dest)
    return dest


def chapter_cnn(cfg: DictConfig, folder: Path) -> dict:
    result, _ = fit(cfg, folder)
    # Scored and exported as the evaluate, export and parity stages do: on the CPU, in fp32.
    model = TorchModel(load_checkpoint(cfg.paths.checkpoint), **cfg.evaluate.tta)
    images, labels = read_split(cfg, "test")
    images = nhwc(images)
    want = predict_probs(model, images, cfg.evaluate.batch_size).numpy()
    metadata = contract.Metadata(
        class_names=model.classifier.hparams.class_names, model_name="gpu-check",
        test_accuracy=float((want.argmax(1) == labels.numpy()).mean()),
        tta_views=tuple(cfg.evaluate.tta.views), tta_shift=cfg.evaluate.tta.shift,
        mlflow_run_id="", git_commit="",
    )  # fmt: skip
    onnx_path = folder / "model.onnx"
    export_onnx(
        model,
        onnx_path,
        metadata,
        cfg.export.opset,
        cfg.parity.atol,
        list(cfg.export.check_batch_sizes),
    )
    got = OnnxModel.load(onnx_path).probabilities(images.numpy(), cfg.parity.batch_size)
    return {
        **result,
        "test_acc": metadata.test_accuracy,
        "parity_max_abs_diff": float(np.abs(got - want).max()),
        "parity_top1_agreement": float((got.argmax(1) == want.argmax(1)).mean()),
    }


def resnet9(cfg: DictConfig, folder: Path, target: float) -> dict:
    result, tracker = fit(cfg, folder, scorer=True)
    reached = [row for row in tracker.rows if row["acc"] >= target]
    return {
        **result,
        "test_acc": tracker.rows[-1]["acc"],
        "best_test_acc": max(row["acc"] for row in tracker.rows),
        "target": target,
        "seconds_to_target": reached[0]["seconds"] if reached else None,
        "epochs_to_target": reached[0]["epoch"] if reached else None,
        "per_epoch": tracker.rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, required=True,
        help="a prepared data set (data/prepared), or CIFAR-10's archive to prepare first",
    )  # fmt: skip
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--resnet-epochs", type=int, default=24)
    parser.add_argument("--target", type=float, default=0.94)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if line := no_gpu_line(args.device):
        sys.exit(line)
    torch.backends.cudnn.benchmark = True
    where = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
    report = {
        "device": where or platform.machine(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "python": platform.python_version(),
    }
    print(f"gpu_check on {report['device']}: torch {report['torch']}, Lightning {pl.__version__}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        folder = Path(tmp)
        started = time.monotonic()
        if args.data.is_file():
            args.data = prepare_archive(args.data, folder / "prepared")
        cfg = compose([*CHAPTER, *args.overrides], args.data, folder / "chapter", args.device)
        report["chapter_cnn"] = chapter_cnn(cfg, folder / "chapter")
        c = report["chapter_cnn"]
        print(
            f"chapter CNN: {c['epochs']} epochs in {c['seconds']:.1f} s, "
            f"{c['images_per_s']:,.0f} images/s; test accuracy {c['test_acc']:.2%}; ONNX parity "
            f"max |diff| {c['parity_max_abs_diff']:.1e}, agreement {c['parity_top1_agreement']:.2%}"
        )
        overrides = [*RESNET9, f"trainer.max_epochs={args.resnet_epochs}", *args.overrides]
        cfg = compose(overrides, args.data, folder / "resnet9", args.device)
        report["resnet9"] = resnet9(cfg, folder / "resnet9", args.target)
        r = report["resnet9"]
        target = f"{args.target:.0%}"
        reached = (
            f"{target} after {r['epochs_to_target']} epochs, {r['seconds_to_target']:.1f} s"
            if r["seconds_to_target"] is not None
            else f"{target} not reached (best {r['best_test_acc']:.2%})"
        )
        print(
            f"ResNet-9: {r['epochs']} epochs in {r['seconds']:.1f} s, {r['images_per_s']:,.0f} "
            f"images/s; test accuracy {r['test_acc']:.2%}; {reached}"
        )
        report["wall_s"] = time.monotonic() - started
    print(f"gpu_check: {report['wall_s']:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    try:
        main()
    except PipelineError as error:
        sys.exit(f"gpu_check: error: {error}")

"""What a config builds for Lightning: the classifier (`cfg.model`, `cfg.optim`), the datamodule
(`cfg.loader`) and the Trainer (`cfg.trainer`, `cfg.callbacks`). No MLflow here:
bench/gpu_check.py trains with these on machines without it."""

import contextlib
import ctypes
import logging
import re
import warnings

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from cnnpipe import PipelineError
from cnnpipe.data.loader import ImageDataModule
from cnnpipe.training.classifier import LitClassifier


def datamodule(cfg: DictConfig) -> ImageDataModule:
    """`cfg.loader`'s datamodule over the prepared data at `paths.data`, split by `seed`."""
    return instantiate(cfg.loader, data=cfg.data, root=cfg.paths.data, seed=cfg.seed)


def module(cfg: DictConfig, data: ImageDataModule) -> LitClassifier:
    """The classifier `cfg.model` and `cfg.optim` describe, sized and normalised for `data`, in
    the memory layout of its batches."""
    classifier = LitClassifier(
        net=OmegaConf.to_container(cfg.model, resolve=True),
        class_names=data.class_names,
        mean=data.mean,
        std=data.std,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        image_size=data.image_size,
    )
    if data.channels_last:
        classifier = classifier.to(memory_format=torch.channels_last)
    return classifier


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


def trainer(cfg: DictConfig, callbacks: list[pl.Callback], **overrides) -> pl.Trainer:
    """`cfg.trainer` passed whole to pl.Trainer, with `cfg.callbacks` and the stage's own."""
    quiet_lightning()
    reuse_freed_memory()
    options = {
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        "precision": precision(cfg),
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


def native_bf16() -> bool:
    """bf16 in the CPU's hardware: AVX-512 BF16 or AMX. oneDNN runs bf16 on other AVX-512 CPUs
    too, emulated, and emulated bf16 trains about 10x slower than fp32 (AVX2-only AMD EPYC: 1.06
    steps/s in bf16-mixed against 10.65 in 32-true)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def on_cpu(cfg: DictConfig) -> bool:
    return cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available()


def precision(cfg: DictConfig) -> str:
    """`trainer.precision`, with "auto" resolved for this machine: bf16-mixed where bf16 is in
    hardware (keeps the recipe's accuracy: docs/performance.md, Time to accuracy), else 32-true."""
    chosen = str(cfg.trainer.precision)
    if chosen != "auto":
        return chosen
    native = native_bf16() if on_cpu(cfg) else torch.cuda.is_bf16_supported()
    return "bf16-mixed" if native else "32-true"


def announce_precision(cfg: DictConfig) -> str:
    """The precision training uses, said in one line where it is not plain fp32."""
    used = precision(cfg)
    if not used.startswith("bf16") or not on_cpu(cfg):
        return used
    if not native_bf16():
        print(
            f"warning: this CPU has no native bf16 ({torch.backends.cpu.get_cpu_capability()}): "
            f"trainer.precision={used} trains about 10x slower here than "
            "trainer.precision=32-true"
        )
    elif cfg.trainer.precision == "auto":
        print(
            "precision: bf16-mixed, as this CPU has native bf16 (AVX-512 BF16 or AMX); "
            "trainer.precision=32-true trains in fp32"
        )
    return used

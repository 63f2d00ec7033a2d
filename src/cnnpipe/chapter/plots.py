"""The chapter's pictures: first-layer filters, feature maps, the most confident mistakes,
training curves and parameter counts."""

import csv
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cnnpipe.base.files import atomic_path
from cnnpipe.training.classifier import LitClassifier, first_conv
from cnnpipe.training.inference import TorchModel, nhwc, predict_probs
from cnnpipe.training.param_count import params_report


def draw(cfg: DictConfig, module: LitClassifier, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Every picture of the report, to `cfg.paths`; returns how many mistakes are shown."""
    c = cfg.chapter
    model = TorchModel(module, **cfg.evaluate.tta)
    probs = predict_probs(model, nhwc(images), cfg.evaluate.batch_size)
    names = module.hparams.class_names
    shown = draw_mistakes(images, labels, probs, names, c.mistakes, Path(cfg.paths.mistakes_png))
    draw_filters(first_conv(module.net), Path(cfg.paths.filters_png))
    draw_feature_maps(
        module, images[: c.feature_map_images], c.maps_per_layer, Path(cfg.paths.feature_maps_png)
    )
    draw_curves(Path(cfg.paths.history), Path(cfg.paths.curves_png))
    dense_baselines = OmegaConf.to_container(cfg.report.dense_baselines)
    draw_params(params_report(module, dense_baselines), Path(cfg.paths.params_png))
    return shown


def draw_filters(conv: nn.Conv2d, path: Path) -> None:
    """Each first-layer filter as a small RGB image, scaled to the full colour range."""
    weights = conv.weight.detach().float()
    lo = weights.amin(dim=(1, 2, 3), keepdim=True)
    hi = weights.amax(dim=(1, 2, 3), keepdim=True)
    tiles = ((weights - lo) / (hi - lo + 1e-8)).permute(0, 2, 3, 1).numpy()
    cols = 8
    rows = -(-len(tiles) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.1))
    for ax, tile in zip(axes.flat, [*tiles, *[None] * (rows * cols - len(tiles))], strict=True):
        ax.axis("off")
        if tile is not None:
            ax.imshow(tile, interpolation="nearest")
    fig.suptitle(
        f"The {len(tiles)} first-layer filters ({conv.kernel_size[0]}x{conv.kernel_size[1]}, RGB)"
    )
    save(fig, path)


def draw_feature_maps(
    module: LitClassifier, images: torch.Tensor, per_layer: int, path: Path
) -> None:
    """For each image: the image, then `per_layer` maps after each convolution, early to deep."""
    convs = [m for m in module.net.modules() if isinstance(m, nn.Conv2d)]
    maps: list[torch.Tensor] = []
    hooks = [c.register_forward_hook(lambda _m, _i, out: maps.append(out.relu())) for c in convs]
    with torch.no_grad():
        module.eval()(images)
    for hook in hooks:
        hook.remove()
    n, layers = len(images), len(convs)
    fig, axes = plt.subplots(n * layers, per_layer + 1, figsize=(per_layer + 1, n * layers * 1.05))
    axes = axes.reshape(n * layers, per_layer + 1)
    for i in range(n):
        for j in range(layers):
            row = axes[i * layers + j]
            for ax in row:
                ax.axis("off")
            if j == 0:
                row[0].imshow(images[i].permute(1, 2, 0).numpy())
            row[1].set_title(f"conv {j + 1}", fontsize=7, loc="left")
            for c in range(min(per_layer, maps[j].shape[1])):
                row[c + 1].imshow(maps[j][i, c].float().numpy(), cmap="viridis")
    fig.suptitle("Feature maps after each convolution (ReLU applied): edges and colours first")
    save(fig, path)


def draw_mistakes(images, labels, probs, names: list[str], count: int, path: Path) -> int:
    """The test images the model got wrong with the highest confidence; returns how many."""
    confidence, predicted = probs.max(1)
    wrong = (predicted != labels).nonzero().flatten()
    worst = wrong[confidence[wrong].argsort(descending=True)][:count]
    cols = 8
    rows = max(1, -(-len(worst) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, worst.tolist(), strict=False):
        ax.imshow(images[i].permute(1, 2, 0).numpy())
        ax.set_title(
            f"true {names[labels[i]]}\npred {names[predicted[i]]} {confidence[i]:.0%}", fontsize=7
        )
    fig.suptitle("The most confident mistakes on the test set")
    save(fig, path)
    return len(worst)


def draw_curves(history_csv: Path, path: Path) -> None:
    with open(history_csv) as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    fig, (loss, acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in ((loss, "loss"), (acc, "acc")):
        for split in ("train", "val"):
            ax.plot(epochs, [float(r[f"{split}/{metric}"]) for r in rows], label=split)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    save(fig, path)


def draw_params(report: dict, path: Path) -> None:
    """Parameters on a log scale: the CNN's layers and total against dense layers on raw pixels."""
    bars = {f"CNN {r['layer']}": r["params"] for r in report["layers"] if r["params"]}
    bars["CNN total"] = report["total_params"]
    colours = ["C0"] * len(bars)
    for b in report["dense_baselines"]:
        bars[f"one dense layer {b['input']}->{b['units']}"] = b["params"]
        colours.append("C3")
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(bars) + 1))
    ax.barh(list(bars), list(bars.values()), color=colours)
    ax.set_xscale("log")
    ax.invert_yaxis()
    for y, value in enumerate(bars.values()):
        ax.text(value, y, f" {value:,}", va="center", fontsize=8)
    ax.set_xlabel("parameters (log scale)")
    ax.set_title("Shared filters stay small; dense layers grow with the image")
    save(fig, path)


def save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight")
    plt.close(fig)

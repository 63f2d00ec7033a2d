"""Stage `chapter`: the textbook chapter's claims about CNNs, each shown by a number or picture."""

import base64
import csv
import json
import os
import re
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import torch
import torch.nn.functional as F
from markdown_it import MarkdownIt
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cnnpipe.args import Parser
from cnnpipe.classifier import LitClassifier, load_checkpoint
from cnnpipe.config import baseline_config, load_params, network_name
from cnnpipe.data import read_split
from cnnpipe.files import atomic_path
from cnnpipe.inference import TorchModel, nhwc, predict_probs
from cnnpipe.param_count import params_report
from cnnpipe.tracking.stage_run import record, stage_run


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


def first_conv(module: LitClassifier) -> nn.Conv2d:
    return next(m for m in module.net.modules() if isinstance(m, nn.Conv2d))


def normalise(module: LitClassifier, images: torch.Tensor) -> torch.Tensor:
    return (images.float() - module.mean) / module.std


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


def chapter(cfg: DictConfig) -> dict:
    """Draw every picture and measure every number; return the numbers."""
    module = load_checkpoint(cfg.paths.checkpoint)
    baseline = load_checkpoint(baseline_config(cfg).paths.checkpoint)
    names = module.hparams.class_names
    images, labels = read_split(cfg, "test")
    c = cfg.chapter
    batch = cfg.evaluate.batch_size

    conv = first_conv(module)
    x = normalise(module, images[:256])
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
    probs = predict_probs(TorchModel(module, **cfg.evaluate.tta), nhwc(images), batch)
    numbers["chapter.mistakes_shown"] = draw_mistakes(
        images, labels, probs, names, c.mistakes, Path(cfg.paths.mistakes_png)
    )
    draw_filters(conv, Path(cfg.paths.filters_png))
    draw_feature_maps(
        module, images[: c.feature_map_images], c.maps_per_layer, Path(cfg.paths.feature_maps_png)
    )
    draw_curves(Path(cfg.paths.history), Path(cfg.paths.curves_png))
    dense_baselines = OmegaConf.to_container(cfg.report.dense_baselines)
    draw_params(params_report(module, dense_baselines), Path(cfg.paths.params_png))
    return numbers


def report(cfg: DictConfig, numbers: dict) -> str:
    """The Markdown report that puts the numbers and pictures next to the claims."""
    params = json.loads(Path(cfg.paths.params_json).read_text())
    cnn_train = json.loads(Path(cfg.paths.train_metrics).read_text())
    cnn_test = json.loads(Path(cfg.paths.eval_metrics).read_text())
    dense = json.loads(Path(cfg.paths.baseline_metrics).read_text())
    here = Path(cfg.paths.chapter_report).parent

    def link(key: str) -> str:
        return Path(os.path.relpath(cfg.paths[key], here)).as_posix()

    shifts = [str(k) for k in cfg.chapter.shifts]
    dense_layers = [
        (f"{h}x{w}x{ch}", units, f"model.dense_layer_{h}x{w}x{ch}_to_{units}")
        for h, w, ch, units in cfg.report.dense_baselines
    ]
    lines = [
        "# What the chapter claims, measured",
        "",
        "## 1. A dense layer on raw pixels explodes; convolutions stay small",
        "",
        f"The whole CNN has {params['model.params']:,} parameters. "
        + " ".join(
            f"One dense layer from a {image} image to {units:,} units has "
            f"{params[f'{key}_params']:,} ({params[f'{key}_times_model']:,}x the CNN)."
            for image, units, key in dense_layers
        ),
        "",
        f"![parameters]({link('params_png')})",
        "",
        "## 2. Convolutions beat a dense network on images",
        "",
        "Same data, augmentation, optimiser, schedule and epochs:",
        "",
        "| Network | Parameters | Test accuracy | Training time |",
        "|---|---:|---:|---:|",
        f"| CNN ({network_name(cfg.model)}) | {params['model.params']:,} "
        f"| {cnn_test['test.acc']:.2%} | {cnn_train['train.seconds']:.0f} s |",
        f"| Dense ({network_name(cfg.baseline.model)}) "
        f"| {dense['baseline.params']:,} | {dense['baseline.test_acc']:.2%} "
        f"| {dense['baseline.train_seconds']:.0f} s |",
        "",
        "## 3. Filters learn to detect edges and colours",
        "",
        f"![first-layer filters]({link('filters_png')})",
        "",
        "## 4. A hierarchy of features",
        "",
        f"![feature maps]({link('feature_maps_png')})",
        "",
        "## 5. Position independence",
        "",
        "Translation equivariance of the first convolution: relative difference between "
        "convolving a shifted image and shifting the convolved image, away from the borders "
        "(0 means exactly equivariant; a layer without weight sharing gives about 1):",
        "",
        "| Shift (pixels) | " + " | ".join(shifts) + " |",
        "|---|" + "---:|" * len(shifts),
        "| Relative error | "
        + " | ".join(f"{numbers[f'chapter.conv1_equivariance_error_shift{k}']:.1e}" for k in shifts)
        + " |",
        "",
        "Tolerance: the share of test images whose predicted class survives a shift "
        "(right and down, zero fill), without test-time views. Pooling makes the CNN's prediction "
        "tolerant of small shifts:",
        "",
        "| Shift (pixels) | " + " | ".join(shifts) + " |",
        "|---|" + "---:|" * len(shifts),
        *(
            f"| {label} | " + " | ".join(f"{numbers[f'{key}_shift{k}']:.1%}" for k in shifts) + " |"
            for label, key in (
                ("CNN", "chapter.cnn_prediction_kept"),
                ("Dense", "chapter.dense_prediction_kept"),
            )
        ),
        "",
        "## 6. Training pictures",
        "",
        f"![loss and accuracy]({link('curves_png')})",
        "",
        f"![confusion matrix]({link('confusion_png')})",
        "",
        f"![most confident mistakes]({link('mistakes_png')})",
        "",
    ]
    return "\n".join(lines)


def self_contained_html(markdown: str, here: Path) -> str:
    """The report as one HTML page with its pictures inside, for viewers that cannot follow a
    relative link (MLflow's artifact view renders HTML, not Markdown images)."""

    def inline(match: re.Match) -> str:
        png = base64.b64encode(Path(os.path.normpath(here / match[1])).read_bytes()).decode()
        return f'src="data:image/png;base64,{png}"'

    body = MarkdownIt("commonmark").enable("table").render(markdown)
    body = re.sub(r'src="([^"]+\.png)"', inline, body)
    style = "body{font-family:sans-serif;max-width:60em}img{max-width:100%}td,th{padding:0 .6em}"
    return f"<!doctype html><meta charset=utf-8><style>{style}</style>{body}"


def main(argv: list[str] | None = None) -> None:
    Parser(prog="cnnpipe chapter", description=__doc__).parse_args(argv)
    cfg = load_params()
    with stage_run(cfg, "chapter"):
        numbers = chapter(cfg)
        record(cfg.paths.chapter_metrics, numbers)
        markdown = report(cfg, numbers)
        with atomic_path(cfg.paths.chapter_report) as tmp:
            tmp.write_text(markdown)
        here = Path(cfg.paths.chapter_report).parent
        mlflow.log_text(self_contained_html(markdown, here), "reports/chapter.html")
    print(f"wrote {cfg.paths.chapter_report}")

"""Stage `params_report`: parameters and multiply-accumulates per layer, against dense layers."""

import argparse

import mlflow
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.model_summary import ModelSummary

from cnnpipe import tracking
from cnnpipe.config import load_params
from cnnpipe.files import atomic_path
from cnnpipe.module import ImageClassifier, load_checkpoint

# Keras folds activations into the layer before them, so its summary has no rows for these.
ACTIVATIONS = {"ReLU", "GELU", "SiLU", "Softmax", "Sigmoid", "Tanh"}


def keras_shape(size: list[int]) -> str:
    """[1, 32, 30, 30] -> (None, 30, 30, 32): the channels-last shape Keras prints."""
    dims = size[1:]
    if len(dims) == 3:
        dims = [*dims[1:], dims[0]]
    return "(" + ", ".join(["None", *map(str, dims)]) + ")"


def params_report(module: ImageClassifier, dense_baselines: list[list[int]]) -> dict:
    """Per-layer table and totals of `module.net`, and the cost of dense layers on raw images."""
    summary = ModelSummary(module, max_depth=2)
    flops = summary.flop_counts
    layers = [
        {
            "layer": name.removeprefix("net."),
            "type": kind,
            "output_shape": keras_shape(out),
            "params": params,
            # A multiply-accumulate is two floating point operations.
            "macs": sum(flops.get(name, {}).values()) // 2,
        }
        for name, kind, out, params in zip(
            summary.layer_names,
            summary.layer_types,
            summary.out_sizes,
            summary.param_nums,
            strict=True,
        )
        if name.startswith("net.") and kind not in ACTIVATIONS
    ]
    total = sum(layer["params"] for layer in layers)
    baselines = []
    for height, width, channels, units in dense_baselines:
        params = height * width * channels * units + units
        baselines.append(
            {
                "input": f"{height}x{width}x{channels}",
                "units": units,
                "params": params,
                "times_model": round(params / total, 2),
            }
        )
    return {
        "total_params": total,
        "trainable_params": summary.trainable_parameters,
        "total_macs": sum(layer["macs"] for layer in layers),
        "layers": layers,
        "dense_baselines": baselines,
    }


def to_metrics(report: dict) -> dict:
    """The numbers worth comparing between runs; the per-layer table is in the Markdown report."""
    metrics = {
        "model/params": report["total_params"],
        "model/trainable_params": report["trainable_params"],
        "model/macs": report["total_macs"],
    }
    for b in report["dense_baselines"]:
        name = f"model/dense_layer_{b['input']}_to_{b['units']}"
        metrics |= {f"{name}_params": b["params"], f"{name}_times_model": b["times_model"]}
    return metrics


def to_markdown(report: dict, model_name: str) -> str:
    lines = [
        f"# Parameters of {model_name}",
        "",
        "Counted as Keras' `model.summary()` counts them (activations belong to the layer before).",
        "",
        "| Layer | Type | Output shape | Params | MACs |",
        "|---|---|---|---:|---:|",
        *(
            f"| {r['layer']} | {r['type']} | {r['output_shape']} "
            f"| {r['params']:,} | {r['macs']:,} |"
            for r in report["layers"]
        ),
        f"| **Total** | | | **{report['total_params']:,}** | **{report['total_macs']:,}** |",
        "",
        "## A dense layer on the raw image instead",
        "",
        "Every pixel value connects to every unit, so the weights grow with the image; "
        "a convolution's filters are shared across positions, so they do not.",
        "",
        "| Input | Units | Params | x this model |",
        "|---|---:|---:|---:|",
        *(
            f"| {b['input']} | {b['units']:,} | {b['params']:,} | {b['times_model']:,} |"
            for b in report["dense_baselines"]
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="cnnpipe params-report", description=__doc__).parse_args(argv)
    cfg: DictConfig = load_params()
    with tracking.stage_run(cfg, "params_report"):
        module = load_checkpoint(cfg.paths.checkpoint)
        report = params_report(module, OmegaConf.to_container(cfg.report.dense_baselines))
        tracking.record(cfg.paths.params_json, to_metrics(report))
        with atomic_path(cfg.paths.params_md) as tmp:
            tmp.write_text(to_markdown(report, cfg.model._target_.rsplit(".", 1)[-1]))
        mlflow.log_artifact(cfg.paths.params_md, "reports")
    print(f"{report['total_params']:,} parameters, {report['total_macs']:,} MACs per image")

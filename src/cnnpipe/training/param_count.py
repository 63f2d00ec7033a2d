"""Parameters and multiply-accumulates per layer of a network, counted as Keras'
`model.summary()` counts them, and what dense layers on the raw image would cost instead."""

from pytorch_lightning.utilities.model_summary import ModelSummary

from cnnpipe.training.classifier import LitClassifier

# Keras folds activations into the layer before them, so its summary has no rows for these.
ACTIVATIONS = {"ReLU", "GELU", "SiLU", "Softmax", "Sigmoid", "Tanh"}


def keras_shape(size: list[int]) -> str:
    """[1, 32, 30, 30] -> (None, 30, 30, 32): the channels-last shape Keras prints."""
    dims = size[1:]
    if len(dims) == 3:
        dims = [*dims[1:], dims[0]]
    return "(" + ", ".join(["None", *map(str, dims)]) + ")"


def params_report(module: LitClassifier, dense_baselines: list[list[int]]) -> dict:
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

"""Stage `params_report`: parameters and multiply-accumulates per layer, against dense layers."""

from omegaconf import DictConfig, OmegaConf

from cnnpipe.base.args import Parser
from cnnpipe.base.config import load_params, network_name
from cnnpipe.base.files import atomic_path


def to_metrics(report: dict) -> dict:
    """The numbers worth comparing between runs; the per-layer table is in the Markdown report."""
    metrics = {
        "model.params": report["total_params"],
        "model.trainable_params": report["trainable_params"],
        "model.macs": report["total_macs"],
    }
    for b in report["dense_baselines"]:
        name = f"model.dense_layer_{b['input']}_to_{b['units']}"
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
    Parser(prog="cnnpipe params-report", description=__doc__).parse_args(argv)
    cfg: DictConfig = load_params()
    import mlflow

    from cnnpipe.tracking.stage_run import record, stage_run
    from cnnpipe.training.classifier import load_checkpoint
    from cnnpipe.training.param_count import params_report

    with stage_run(cfg, "params_report"):
        module = load_checkpoint(cfg.paths.checkpoint)
        report = params_report(module, OmegaConf.to_container(cfg.report.dense_baselines))
        record(cfg.paths.params_json, to_metrics(report))
        with atomic_path(cfg.paths.params_md) as tmp:
            tmp.write_text(to_markdown(report, network_name(cfg.model)))
        mlflow.log_artifact(cfg.paths.params_md, "reports")
    print(f"{report['total_params']:,} parameters, {report['total_macs']:,} MACs per image")

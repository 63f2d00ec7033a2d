"""Stage `export`: an ONNX file that takes decoded images and returns class probabilities."""

import json
from pathlib import Path

from omegaconf import DictConfig

from cnnpipe import PipelineError
from cnnpipe.artifact import contract
from cnnpipe.base.args import Parser
from cnnpipe.base.config import dataset_name, load_params, registered_name


def test_accuracy(eval_metrics: Path) -> float:
    try:
        return float(json.loads(eval_metrics.read_text())["test.acc"])
    except (OSError, ValueError, KeyError, TypeError):
        raise PipelineError(f"no test.acc in {eval_metrics}; run `dvc repro evaluate`") from None


def drift_reference(path: Path) -> dict:
    try:
        reference = json.loads(path.read_text())
        reference["signals"]
    except (OSError, ValueError, KeyError, TypeError):
        raise PipelineError(f"no drift reference in {path}; run `dvc repro evaluate`") from None
    return reference


def main(argv: list[str] | None = None) -> None:
    Parser(prog="cnnpipe export", description=__doc__).parse_args(argv)
    cfg: DictConfig = load_params()
    from cnnpipe.artifact.onnx_export import export_onnx
    from cnnpipe.tracking.lineage import git_commit
    from cnnpipe.tracking.stage_run import stage_run
    from cnnpipe.training.classifier import load_checkpoint
    from cnnpipe.training.inference import TorchModel

    with stage_run(cfg, "export") as run:
        module = load_checkpoint(cfg.paths.checkpoint)
        commit, dirty = git_commit()
        metadata = contract.Metadata(
            class_names=module.hparams.class_names,
            model_name=registered_name(cfg),
            dataset=dataset_name(cfg.data),
            # What `cnnpipe serve` shows: evaluate scored the same TorchModel this file computes.
            test_accuracy=test_accuracy(Path(cfg.paths.eval_metrics)),
            tta_views=tuple(cfg.evaluate.tta.views),
            tta_shift=cfg.evaluate.tta.shift,
            drift_reference=drift_reference(Path(cfg.paths.drift_reference)),
            mlflow_run_id=run.info.run_id,
            git_commit=commit + ("-dirty" if dirty else ""),
        )
        path = Path(cfg.paths.onnx)
        model = TorchModel(module, **cfg.evaluate.tta)
        export_onnx(
            model,
            path,
            metadata,
            cfg.export.opset,
            cfg.parity.atol,
            list(cfg.export.check_batch_sizes),
        )
    print(f"exported {path} ({path.stat().st_size:,} bytes, opset {cfg.export.opset})")

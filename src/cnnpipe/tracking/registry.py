"""The model registry: an ONNX model logged with MLflow's flavour and registered as a new
version, the aliases the gate sets (`@champion`, `@challenger`, cnnpipe.tracking.gate), and a
registered version fetched to serve."""

from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException

from cnnpipe import PipelineError
from cnnpipe.tracking.store import quiet_mlflow, store_errors, tracking_uri

CHAMPION = "champion"
# A registered version that did not pass the gate to @champion: the newest such.
CHALLENGER = "challenger"


# The step a logged model is recorded at in its run: one no metric has, since MLflow links every
# metric of the run at the model's step to it (the system metrics' first sample, the summary of
# every stage), where only the model's own results belong.
MODEL_STEP = -1


def log_onnx_model(
    path: Path,
    name: str,
    registered_name: str,
    description: str,
    example: tuple[np.ndarray, np.ndarray],
    results: dict[str, float],
    dataset: MetaDataset,
) -> str:
    """Log the ONNX file at `path` to the active run as `name` with MLflow's ONNX flavour, an
    (input, output) `example` for its signature and its `results` on `dataset` as its metrics,
    and register it as a new version of `registered_name` described by `description`
    (Markdown); returns the version. `results` are logged to the run too, so they must be the
    values the run has under those names."""
    import onnx
    from mlflow.models import infer_signature

    info = mlflow.onnx.log_model(
        onnx.load(path),
        name=name,
        registered_model_name=registered_name,
        signature=infer_signature(*example),
        input_example=example[0],
        save_as_external_data=False,
        onnx_execution_providers=["CPUExecutionProvider"],
        step=MODEL_STEP,
    )
    mlflow.log_metrics(results, model_id=info.model_id, dataset=dataset)
    version = str(info.registered_model_version)
    mlflow.MlflowClient().update_model_version(registered_name, version, description)
    return version


def champion_version(client: MlflowClient, name: str) -> str | None:
    """The version `@champion` points at, or None."""
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def version_of_run(client: MlflowClient, name: str, run_id: str) -> str:
    """The newest version of `name` registered from run `run_id` (by the parity stage)."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not found:
        raise PipelineError(
            f"no version of {name} registered from run {run_id}; run `dvc repro parity`"
        )
    return str(max(int(v.version) for v in found))


def settle(client: MlflowClient, name: str, version: str, promoted: bool, record: dict) -> None:
    """Record the gate's figures and decision on `version` as tags, and point `@champion` at it
    if it was `promoted`, else `@challenger`."""
    for key, value in record.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.set_registered_model_alias(name, CHAMPION if promoted else CHALLENGER, version)


def resolve(uri: str) -> dict[str, str | None]:
    """models:/NAME/VERSION or models:/NAME@ALIAS -> its name, version and alias, asked of the
    MLflow store (MLFLOW_TRACKING_URI, else ./mlflow.db as the pipeline's default)."""
    name, at, alias = uri.removeprefix("models:/").partition("@")
    name, _, number = (name, "", "") if at else name.rpartition("/")
    if not name or not (alias or number):
        raise PipelineError(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    quiet_mlflow()
    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    with store_errors():
        try:
            found = (
                client.get_model_version_by_alias(name, alias)
                if alias
                else client.get_model_version(name, number)
            )
        except mlflow.MlflowException as error:
            if alias:
                raise PipelineError(f"{uri}: {missing_alias(client, name, alias)}") from None
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            reason = error.message.splitlines()[0]
            raise PipelineError(f"{uri}: {reason} in {mlflow.get_tracking_uri()}") from None
    return {
        "name": name,
        "version": str(found.version),
        "alias": alias or (found.aliases[0] if found.aliases else None),
    }


def fetch_registered(uri: str) -> tuple[str, dict[str, str | None]]:
    """models:/NAME/VERSION or models:/NAME@ALIAS -> the version's ONNX file, downloaded from the
    MLflow store, and its name, version and alias."""
    registered = resolve(uri)
    with store_errors():
        where = f"models:/{registered['name']}/{registered['version']}"
        folder = mlflow.artifacts.download_artifacts(where)
    return str(Path(folder) / "model.onnx"), registered


def missing_alias(client: MlflowClient, name: str, alias: str) -> str:
    """Why `name@alias` is not there, in words: the model is unknown, or the aliases it has."""
    try:
        aliases = sorted(client.get_registered_model(name).aliases)
    except MlflowException:
        return f"no registered model {name} in {mlflow.get_tracking_uri()}"
    has = f"its aliases are {', '.join('@' + a for a in aliases)}" if aliases else "it has none"
    return f"{name} has no alias @{alias}; {has}"

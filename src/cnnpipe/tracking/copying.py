"""A store's runs, logged models and registered versions copied into another store (`cnnpipe
share`): each copy tagged with the id it came from, so that copying again adds only what is new
and a stage finds the copy of the run it recorded (stage_run.located)."""

import contextlib
import os
import tempfile
from collections.abc import Iterator

import mlflow
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities import LoggedModelOutput, Metric, Param
from mlflow.tracking._tracking_service import utils as tracking_utils

from cnnpipe.tracking.probe import PROBE
from cnnpipe.tracking.stage_run import COPIED_FROM


@contextlib.contextmanager
def current(uri: str) -> Iterator[None]:
    """`uri` as MLflow's current store, and afterwards whatever was before: MLflow keeps it in
    a global and in MLFLOW_TRACKING_URI, which every later command would inherit."""
    saved = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri = saved[0]
        if saved[1] is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved[1]


class Copier:
    """Copies from the store at URI `source` to the one at `target`, remembering new ids for
    old."""

    def __init__(self, source: str, target: str) -> None:
        self.uris = source, target
        self.source, self.target = (MlflowClient(uri, registry_uri=uri) for uri in self.uris)
        self.runs: dict[str, str] = {}
        self.models: dict[str, str] = {}
        self.experiments: dict[str, str] = {}
        self.counts = {"runs": 0, "models": 0, "versions": 0, "kept": 0}
        # The aliases the target already had elsewhere, in words.
        self.kept: list[str] = []

    def everything(self) -> dict[str, int]:
        # MLflow downloads a models:/ URI from the current store, and resolves a new version's
        # models:/ source there: the source store first, then the target.
        with current(self.uris[0]):
            self.experiments_and_runs()
        with current(self.uris[1]):
            for registered in self.source.search_registered_models():
                self.registered(registered)
        return self.counts

    def experiments_and_runs(self) -> None:
        for experiment in self.source.search_experiments():
            runs = self.source.search_runs([experiment.experiment_id], order_by=["start_time"])
            if not runs:
                continue
            self.experiments[experiment.experiment_id] = self.experiment(experiment)
            for run in runs:
                self.run(run)
            for model in self.source.search_logged_models([experiment.experiment_id]):
                self.logged_model(model)
            for run in runs:
                self.run_results(run)

    def experiment(self, experiment) -> str:
        found = self.target.get_experiment_by_name(experiment.name)
        if found:
            return found.experiment_id
        return self.target.create_experiment(experiment.name, tags=experiment.tags)

    def run(self, run) -> None:
        """The run itself, with its params and tags, or the copy made before."""
        old, experiment = run.info.run_id, self.experiments[run.info.experiment_id]
        copies = self.target.search_runs(
            [experiment], filter_string=f"tags.`{COPIED_FROM}` = '{old}'"
        )
        if copies:
            self.runs[old] = copies[0].info.run_id
            self.counts["kept"] += 1
            return
        tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.log-model")}
        if parent := tags.get("mlflow.parentRunId"):
            tags["mlflow.parentRunId"] = self.runs.get(parent, parent)
        tags[COPIED_FROM] = old
        new = self.target.create_run(
            experiment, start_time=run.info.start_time, tags=tags, run_name=run.info.run_name
        )
        self.runs[old] = new.info.run_id
        self.counts["runs"] += 1

    def logged_model(self, model) -> None:
        """The logged model and its files, or the complete copy made before."""
        found = self.target.search_logged_models(
            [self.experiments[model.experiment_id]],
            filter_string=f"tags.`{COPIED_FROM}` = '{model.model_id}'",
        )
        if ready := [m for m in found if str(m.status) == "READY"]:
            self.models[model.model_id] = ready[0].model_id
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = download_artifacts(f"models:/{model.model_id}", dst_path=tmp)
            new = self.target.create_logged_model(
                self.experiments[model.experiment_id],
                name=model.name,
                source_run_id=self.runs.get(model.source_run_id),
                tags={**model.tags, COPIED_FROM: model.model_id},
                params=model.params,
                model_type=model.model_type,
            )
            self.target.log_model_artifacts(new.model_id, local)
        self.target.finalize_logged_model(new.model_id, "READY")
        self.models[model.model_id] = new.model_id
        self.counts["models"] += 1

    def run_results(self, run) -> None:
        """A new copy's metrics (each one's history), datasets, outputs, artifacts and status."""
        old, new = run.info.run_id, self.runs[run.info.run_id]
        if self.target.get_run(new).info.status != "RUNNING" or run.info.status == "RUNNING":
            return  # copied before, or still being written where it is
        params = [Param(k, v) for k, v in run.data.params.items()]
        for start in range(0, len(params), 100):
            self.target.log_batch(new, params=params[start : start + 100])
        metrics = [m for key in run.data.metrics for m in self.history(old, key)]
        for start in range(0, len(metrics), 1000):
            self.target.log_batch(new, metrics=metrics[start : start + 1000])
        if run.inputs and run.inputs.dataset_inputs:
            self.target.log_inputs(new, datasets=run.inputs.dataset_inputs)
        if run.outputs and run.outputs.model_outputs:
            outputs = [LoggedModelOutput(self.models[o.model_id], o.step)
                       for o in run.outputs.model_outputs if o.model_id in self.models]  # fmt: skip
            self.target.log_outputs(new, outputs)
        self.artifacts(old, new)
        if note := run.data.tags.get("mlflow.note.content"):
            self.target.set_tag(new, "mlflow.note.content", self.relinked(note))
        self.target.set_terminated(new, run.info.status, end_time=run.info.end_time)

    def history(self, run_id: str, key: str) -> list:
        return [
            Metric(
                m.key,
                m.value,
                m.timestamp,
                m.step,
                model_id=self.models.get(m.model_id),
                dataset_name=m.dataset_name,
                dataset_digest=m.dataset_digest,
            )  # fmt: skip
            for m in self.source.get_metric_history(run_id, key)
        ]

    def artifacts(self, old: str, new: str) -> None:
        for item in self.source.list_artifacts(old):
            if item.path in (PROBE,):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                local = download_artifacts(run_id=old, artifact_path=item.path, dst_path=tmp)
                if item.is_dir:
                    self.target.log_artifacts(new, local, item.path)
                else:
                    self.target.log_artifact(new, local)

    def registered(self, registered) -> None:
        """The registered model, its versions (sources and runs mapped to the copies) and its
        aliases on the versions they named."""
        name = registered.name
        if not self.target.search_registered_models(f"name = '{name}'"):
            self.target.create_registered_model(name, registered.tags, registered.description)
        copied = {
            v.tags.get(COPIED_FROM): v.version
            for v in self.target.search_model_versions(f"name = '{name}'")
        }
        versions = {}
        olds = self.source.search_model_versions(f"name = '{name}'")
        for version in sorted(olds, key=lambda v: int(v.version)):
            key = f"{name}/{version.version}"
            if key in copied:
                versions[version.version] = copied[key]
                continue
            # The logged model a version was made from: its model_id, or its source models:/m-...
            logged = version.model_id or version.source.removeprefix("models:/")
            model_id = self.models.get(logged)
            new = self.target.create_model_version(
                name,
                source=f"models:/{model_id}" if model_id else version.source,
                run_id=self.runs.get(version.run_id),
                tags={**version.tags, COPIED_FROM: key},
                description=self.relinked(version.description or ""),
                model_id=model_id,
            )
            versions[version.version] = new.version
            self.counts["versions"] += 1
        # An alias the target has already names the team's choice: it stays where it is.
        taken = self.target.get_registered_model(name).aliases
        for alias, version in registered.aliases.items():
            if alias in taken and taken[alias] != versions[version]:
                self.kept.append(f"@{alias} of {name} stays version {taken[alias]} there")
            elif alias not in taken:
                self.target.set_registered_model_alias(name, alias, versions[version])

    def relinked(self, text: str) -> str:
        """`text` with its links to old runs and experiments pointing at the copies."""
        for old, new in {**self.runs, **self.models}.items():
            text = text.replace(old, new)
        for old, new in self.experiments.items():
            text = text.replace(f"#/experiments/{old}/", f"#/experiments/{new}/")
        return text

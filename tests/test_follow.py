"""`cnnpipe serve models:/NAME@ALIAS` follows its alias: a new version is swapped into every
worker between batches while requests keep coming, and a version of other classes, or a registry
that cannot be reached, leaves the old version serving with one log line."""

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cnnpipe.base.localhost import free_port, wait_for_http, wait_until
from cnnpipe.serving.onnx_model import OnnxModel
from tests.helpers import CLASSES, call, export_random_model, png, samples


def register(tmp_path: Path) -> tuple[str, list[Path]]:
    """Versions 1 and 2 of `cnn` (the same classes, other weights) and 3 (other classes), with
    @champion on 1, in a sqlite store: its URI and the three files."""
    import mlflow
    import onnx

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    files = [
        export_random_model(tmp_path / "v1.onnx", CLASSES, ("image",)),
        export_random_model(tmp_path / "v2.onnx", CLASSES, ("image", "mirror")),
        export_random_model(tmp_path / "v3.onnx", ["cat", "dog", "ship"], ("image",)),
    ]
    experiment = mlflow.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        for file in files:
            mlflow.onnx.log_model(onnx.load(file), name="m", registered_model_name="cnn")
    mlflow.MlflowClient().set_registered_model_alias("cnn", "champion", "1")
    return uri, files


@pytest.mark.slow
def test_the_service_follows_its_alias_without_failing_a_request(tmp_path):
    import mlflow

    store, files = register(tmp_path)
    client = mlflow.MlflowClient(store)
    port, log = free_port(), tmp_path / "serve.log"
    command = [str(Path(sys.executable).parent / "cnnpipe"), "serve", "models:/cnn@champion"]
    options = ["--port", str(port), "--workers", "2", "--alias-check-s", "0.5"]
    with open(log, "w") as stderr:
        service = subprocess.Popen(
            [*command, *options], stdout=subprocess.DEVNULL, stderr=stderr,
            env={**os.environ, "MLFLOW_TRACKING_URI": store},
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            statuses.append(call(f"{url}/predict", png(image), "image/png")[0])

    def swaps(outcome: str) -> float:
        return samples(url).get(("cnnpipe_model_swaps_total", (("outcome", outcome),)), 0)

    try:
        wait_for_http(f"{url}/health/ready", service, "cnnpipe serve", deadline_s=60)
        with ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(load)
            try:
                assert call(f"{url}/health")[1]["version"] == "1"
                client.set_registered_model_alias("cnn", "champion", "2")
                wait_until("both workers on version 2", lambda: swaps("swapped") == 2, 30)
                answer = call(f"{url}/predict", png(image), "image/png")[1]["predictions"][0]
                want = OnnxModel.load(files[1]).probabilities(image[None])[0]
                assert answer["top_k"][0]["probability"] == np.float32(want.max()).item()

                client.set_registered_model_alias("cnn", "champion", "3")
                wait_until("both workers refuse version 3", lambda: swaps("refused") == 2, 30)
                assert {call(f"{url}/health")[1]["version"] for _ in range(6)} == {"2"}

                # The store broken in place (the service's open connections see it) and mended.
                database = tmp_path / "mlflow.db"
                content = database.read_bytes()
                database.write_bytes(bytes(len(content)))
                wait_until("the check fails", lambda: "cannot check" in log.read_text(), 30)
                database.write_bytes(content)
                wait_until("the check works again", lambda: "checked again:" in log.read_text(), 30)
            finally:
                stop.set()
        info = samples(url)
        assert info[("cnnpipe_model_info", model_labels(info, "2"))] == 1
        assert info[("cnnpipe_model_info", model_labels(info, "1"))] == 0
        service.terminate()
        assert service.wait(timeout=30) == 0
    finally:
        stop.set()
        service.kill()
        service.wait(timeout=30)
    assert statuses and set(statuses) == {200}, "no request failed during the swaps"
    said = [line for line in log.read_text().splitlines() if line.startswith("cnnpipe serve:")]
    assert said.count("cnnpipe serve: serving version 2") == 2, said
    refused = "its classes or input size differ from version 2's; version 2 serves on"
    unreachable = f"models:/cnn@champion: no registered model cnn in {store}"
    assert said[-3:] == [
        f"cnnpipe serve: version 3 not swapped in: {refused}",
        f"cnnpipe serve: cannot check models:/cnn@champion ({unreachable}); version 2 serves on, "
        "checked again every 0.5 s",
        "cnnpipe serve: models:/cnn@champion checked again: version 2 serves",
    ]


def model_labels(samples_: dict, version: str) -> tuple:
    """The label set of cnnpipe_model_info for `version`."""
    (labels,) = [
        labels for name, labels in samples_
        if name == "cnnpipe_model_info" and ("version", version) in labels
    ]  # fmt: skip
    return labels

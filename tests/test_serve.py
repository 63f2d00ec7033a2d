"""The HTTP service, started with uvicorn on a free local port and called over real HTTP."""

import hashlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cnnpipe import PipelineError
from cnnpipe.base.localhost import wait_until
from cnnpipe.serving.app import Limits, create_app
from cnnpipe.serving.onnx_model import OnnxModel
from cnnpipe.serving.server import running
from tests.helpers import (
    CLASSES,
    call,
    export_random_model,
    foreign_model,
    png,
    samples,
    with_reference,
)

LIMIT = 200_000
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    return export_random_model(path, CLASSES, ("image",))


@pytest.fixture(scope="module", params=[("httptools", "uvloop"), ("h11", "asyncio")])
def server(request, model_path):
    """The service with its C parser and loop, and with the pure-Python ones: every answer and
    deadline must hold with both."""
    app = create_app(str(model_path), Limits(LIMIT, top_k=2, body_timeout_s=TIMEOUT_S))
    parser, loop = request.param
    with running(app, header_timeout_s=TIMEOUT_S, parser=parser, loop=loop) as url:
        yield url


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "cnnpipe-test-boundary"
    body = b""
    for name, data in files:
        head = f'Content-Disposition: form-data; name="file"; filename="{name}"'
        body += f"--{boundary}\r\n{head}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_probes_and_metadata(server, model_path):
    assert call(f"{server}/health/live") == (200, {"status": "alive"})
    status, ready = call(f"{server}/health/ready")
    assert status == 200 and ready["status"] == "ready" and ready["model"] == "cnnpipe-test"
    assert call(f"{server}/health") == (status, ready)
    status, meta = call(f"{server}/metadata")
    assert status == 200 and meta["class_names"] == CLASSES and meta["max_body_bytes"] == LIMIT
    model = meta["model"]
    assert (model["name"], model["version"], model["test_accuracy"]) == ("cnnpipe-test", None, 0.5)
    assert model["input"] == {"name": "images", "datatype": "uint8", "shape": [-1, 32, 32, 3]}
    assert model["output"] == {"name": "probabilities", "datatype": "float32", "shape": [-1, 10]}
    assert model["sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()


def test_openapi_describes_the_routes_for_programs(server):
    status, spec = call(f"{server}/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.")
    assert {p: sorted(ops) for p, ops in spec["paths"].items()} == {
        "/health/live": ["get"],
        "/health/ready": ["get"],
        "/metadata": ["get"],
        "/predict": ["post"],
    }
    predict = spec["paths"]["/predict"]["post"]
    assert {"image/*", "multipart/form-data"} == set(predict["requestBody"]["content"])
    codes = {str(code) for code in predict["responses"]}
    assert codes == {"200", "400", "408", "413", "415", "503"}


def test_metrics_count_what_was_served(model_path):
    # A server of its own: the counts start at zero.
    with running(create_app(str(model_path), Limits(LIMIT))) as url:
        image = png(np.zeros((32, 32, 3), dtype=np.uint8))
        for _ in range(3):
            assert call(f"{url}/predict", image, "image/png")[0] == 200
        assert call(f"{url}/predict", *multipart([("a.png", image)] * 4))[0] == 200
        assert call(f"{url}/predict", b"hello", "text/plain")[0] == 415
        assert call(f"{url}/no/such/page") == (
            404,
            {"error": "Not Found; the routes are in /openapi.json"},
        )
        got = samples(url)
    requests = "cnnpipe_http_requests_total"
    assert got[(requests, (("method", "POST"), ("route", "/predict"), ("status", "200")))] == 4
    assert got[(requests, (("method", "POST"), ("route", "/predict"), ("status", "415")))] == 1
    assert got[(requests, (("method", "GET"), ("route", "other"), ("status", "404")))] == 1
    assert got[("cnnpipe_images_classified_total", ())] == 3 + 4
    latency = "cnnpipe_http_request_duration_seconds"
    assert got[(f"{latency}_count", (("route", "/predict"),))] == 5
    assert got[(f"{latency}_bucket", (("le", "+Inf"), ("route", "/predict")))] == 5
    info = next(labels for name, labels in got if name == "cnnpipe_model_info")
    assert dict(info)["name"] == "cnnpipe-test" and dict(info)["file"] == str(model_path)


def test_page_is_served_without_anything_from_elsewhere(server):
    with urllib.request.urlopen(f"{server}/", timeout=30) as response:
        page = response.read().decode()
    assert response.headers["Content-Type"].startswith("text/html")
    assert 'type="file"' in page and "http://" not in page and "https://" not in page


def test_raw_image_gets_the_models_probabilities(server, model_path):
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    status, answer = call(f"{server}/predict", png(pixels), "image/png")
    assert status == 200
    (prediction,) = answer["predictions"]
    probs = OnnxModel.load(model_path).probabilities(pixels[None])[0]
    assert prediction["top_k"][0]["label"] == CLASSES[int(probs.argmax())]
    assert prediction["top_k"][0]["probability"] == pytest.approx(float(probs.max()), abs=1e-6)
    assert len(prediction["top_k"]) == 2 and prediction["note"] is None


def test_multipart_with_several_images(server):
    rng = np.random.default_rng(2)
    files = [
        ("a.png", png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))),
        ("b.png", png(rng.integers(0, 256, (40, 50), dtype=np.uint8))),
    ]
    status, answer = call(f"{server}/predict", *multipart(files))
    assert status == 200
    assert [p["file"] for p in answer["predictions"]] == ["a.png", "b.png"]
    assert answer["predictions"][1]["note"] == "resized from 50x40"


@pytest.mark.parametrize(
    "body, content_type, status, message",
    [
        (b"x" * (LIMIT + 1), "image/png", 413, "body over"),
        (b"hello", "text/plain", 415, "send an image"),
        (b"not an image at all", "image/jpeg", 400, "not a readable image"),
        (b"", "image/png", 400, "not a readable image"),
        (multipart([("bad.png", b"GIF89a broken")])[0], multipart([])[1], 400, "bad.png"),
    ],
    ids=["too-large", "wrong-type", "corrupt", "empty", "corrupt-part"],
)
def test_bad_requests_get_json_errors(server, body, content_type, status, message):
    got, answer = call(f"{server}/predict", body, content_type)
    assert got == status and message in answer["error"]
    assert call(f"{server}/health")[0] == 200, "the server stays up"


def test_stalled_body_gets_408_while_other_clients_are_served(server):
    host, port = server.removeprefix("http://").split(":")
    stalled = socket.create_connection((host, int(port)))
    head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    stalled.sendall(f"{head}Content-Length: 5000\r\n\r\n".encode() + b"\x89PNG")
    start = time.perf_counter()
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    assert call(f"{server}/predict", png(pixels), "image/png")[0] == 200
    stalled.settimeout(10)
    # The head and the JSON body may come in separate packets; each recv waits 10 s at most.
    answer = b""
    while b"not received within" not in answer and (chunk := stalled.recv(4096)):
        answer += chunk
    seconds = time.perf_counter() - start
    stalled.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"not received within 1 s" in answer
    assert TIMEOUT_S <= seconds < TIMEOUT_S + 5


def trickle(url: str, head: bytes, every_s: float, limit_s: float) -> tuple[str, float]:
    """Send `head` a byte every `every_s`; the server's answer and when it came (or hung up)."""
    host, port = url.removeprefix("http://").split(":")
    start = time.perf_counter()
    with socket.create_connection((host, int(port))) as client:
        client.settimeout(every_s)
        for byte in head:
            if time.perf_counter() - start > limit_s:
                break
            try:
                client.sendall(bytes([byte]))
                return client.recv(4096).decode(), time.perf_counter() - start
            except TimeoutError:  # nothing back yet: send the next byte
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
    return "", time.perf_counter() - start


def test_trickled_headers_are_cut_off_at_the_header_timeout(server):
    head = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    answer, seconds = trickle(server, head, every_s=0.1, limit_s=10)
    assert answer.startswith("HTTP/1.1 408") and "headers not received within 1 s" in answer
    # asyncio runs a timer up to its clock's resolution early.
    assert TIMEOUT_S - 0.01 <= seconds < TIMEOUT_S + 2
    assert call(f"{server}/health/live")[0] == 200, "other clients are served"


def test_headers_on_time_are_answered_on_a_kept_alive_connection(server):
    connection = http.client.HTTPConnection(server.removeprefix("http://"), timeout=10)
    sockets = []
    for _ in range(3):
        connection.request("GET", "/health/live")
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, b'{"status":"alive"}')
        sockets.append(connection.sock)
        time.sleep(TIMEOUT_S * 0.6)  # longer than the deadline in all, within it for each request
    connection.close()
    assert sockets[0] is sockets[1] is sockets[2], "one connection served all three"


def test_a_model_of_another_shape_is_refused_at_start(tmp_path):
    other = foreign_model(tmp_path / "other.onnx", CLASSES)
    want = (
        f"{other} takes float (N, 10) and returns float (N, 10); cnnpipe needs uint8 (N, H, W, 3)"
    )
    with pytest.raises(PipelineError, match=re.escape(want)):
        create_app(str(other))
    cnnpipe = [sys.executable, "-m", "cnnpipe.cli", "serve", str(other), "--port", "0"]
    result = subprocess.run(cnnpipe, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith(f"cnnpipe serve: error: {want}")
    assert len(result.stderr.strip().splitlines()) == 1


def test_many_files_at_once_are_served_up_to_the_part_limit(server):
    small = png(np.full((8, 8, 3), 200, dtype=np.uint8))
    status, answer = call(
        f"{server}/predict", *multipart([(f"{i}.png", small) for i in range(256)])
    )
    assert status == 200 and len(answer["predictions"]) == 256
    status, answer = call(f"{server}/predict", *multipart([("x.png", small)] * 257))
    assert status == 400 and "Too many files" in answer["error"]


def test_a_registered_version_is_served_with_its_name_version_and_alias(
    tmp_path, model_path, monkeypatch
):
    import mlflow
    import onnx

    from cnnpipe.tracking.registry import fetch_registered

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        for _ in range(2):
            mlflow.onnx.log_model(onnx.load(model_path), name="m", registered_model_name="cnn")
    mlflow.MlflowClient().set_registered_model_alias("cnn", "champion", "2")

    path, registered = fetch_registered("models:/cnn@champion")
    assert registered == {"name": "cnn", "version": "2", "alias": "champion"}
    assert fetch_registered("models:/cnn/1")[1] == {"name": "cnn", "version": "1", "alias": None}
    with running(create_app(path, registered=registered)) as url:
        model = call(f"{url}/metadata")[1]["model"]
    assert (model["name"], model["version"], model["alias"]) == ("cnn", "2", "champion")
    assert model["test_accuracy"] == 0.5, "the file's own metadata"
    with pytest.raises(
        PipelineError, match=r"^models:/cnn/7: Model Version .* not found in sqlite"
    ):
        fetch_registered("models:/cnn/7")
    with pytest.raises(PipelineError, match=r"^models:/cnn@best: cnn has no alias @best; its "
                       r"aliases are @champion$"):  # fmt: skip
        fetch_registered("models:/cnn@best")
    with pytest.raises(PipelineError, match=r"^models:/resnet@champion: no registered model "
                       r"resnet in sqlite:///"):  # fmt: skip
        fetch_registered("models:/resnet@champion")


def test_open_inference_protocol_infers_like_predict(server, model_path):
    for probe in ("/v2/health/live", "/v2/health/ready", "/v2/models/cnnpipe-test/ready"):
        with urllib.request.urlopen(f"{server}{probe}", timeout=30) as response:
            assert response.status == 200
    status, meta = call(f"{server}/v2/models/cnnpipe-test")
    assert status == 200 and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
    assert meta["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(CLASSES)]}
    ]
    images = np.random.default_rng(5).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    tensor = {"name": "images", "shape": [2, 32, 32, 3], "datatype": "UINT8"}
    request = {"inputs": [{**tensor, "data": images.reshape(-1).tolist()}]}
    status, answer = call(
        f"{server}/v2/models/cnnpipe-test/infer", json.dumps(request).encode(), "application/json"
    )
    assert status == 200 and answer["model_name"] == "cnnpipe-test"
    (output,) = answer["outputs"]
    assert output["shape"] == [2, len(CLASSES)] and output["datatype"] == "FP32"
    want = OnnxModel.load(model_path).probabilities(images)
    np.testing.assert_allclose(np.reshape(output["data"], (2, -1)), want, atol=1e-6)


@pytest.mark.parametrize(
    "path, tensor, status, message",
    [
        ("cnnpipe-test", {"datatype": "FP32"}, 400, "datatype must be UINT8, not FP32"),
        ("cnnpipe-test", {"shape": [1, 28, 28, 1]}, 400, "shape must be [N, 32, 32, 3]"),
        ("cnnpipe-test", {"data": [0] * 5}, 400, "data has 5 values; shape [1, 32, 32, 3] needs"),
        ("cnnpipe-test", {"data": [300] * 3072}, 400, "UINT8 data must be in 0-255"),
        ("resnet", {}, 404, "no model resnet; this server has cnnpipe-test"),
        (
            "cnnpipe-test/versions/7",
            {},
            404,
            "model cnnpipe-test has no version 7; this server has version 1",
        ),
    ],
    ids=["datatype", "shape", "size", "range", "model", "version"],
)
def test_open_inference_protocol_refuses_bad_tensors_in_one_line(
    server, path, tensor, status, message
):
    good = {"name": "images", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [0] * 3072}
    body = json.dumps({"inputs": [{**good, **tensor}]}).encode()
    got, answer = call(f"{server}/v2/models/{path}/infer", body, "application/json")
    assert got == status and answer["error"].startswith(message)


def infer_body(**tensor) -> bytes:
    good = {"name": "images", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [0] * 3072}
    return json.dumps({"inputs": [{**good, **tensor}]}).encode()


# Bodies a hostile or broken client may send, from the protocol's JSON tensor: every part of the
# request of the wrong kind or out of range, and JSON that Python's parser takes but that is
# not plain JSON or not data.
HOSTILE = {
    "not utf-8": b"\xff\xfe{}",
    "not JSON": b"{inputs: [",
    "a number, not an object": b"1e999",
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "deep nesting in data": infer_body(data=[]).replace(b"[]", b"[" * 50_000 + b"]" * 50_000),
    "NaN": infer_body().replace(b"[0, ", b"[NaN, ", 1),
    "Infinity": infer_body().replace(b"[0, ", b"[Infinity, ", 1),
    "-Infinity": infer_body().replace(b"[0, ", b"[-Infinity, ", 1),
    "an integer too large for any type": infer_body().replace(
        b"[0, ", b"[" + b"9" * 400 + b", ", 1
    ),
    "an integer over 4300 digits": infer_body().replace(b"[0, ", b"[" + b"9" * 5000 + b", ", 1),
    "a negative value": infer_body(data=[-1] * 3072),
    "floats": infer_body(data=[0.5] * 3072),
    "booleans": infer_body(data=[True] * 3072),
    "strings": infer_body(data=["1"] * 3072),
    "nulls": infer_body(data=[None] * 3072),
    "objects": infer_body(data=[{}] * 3072),
    "ragged nesting": infer_body(data=[[0] * 3071, [0, 0]]),
    "data not a list": infer_body(data="0" * 3072),
    "a huge batch claimed": infer_body(shape=[10**30, 32, 32, 3]),
    "a float shape": infer_body(shape=[1.0, 32, 32, 3]),
    "a boolean shape": infer_body(shape=[True, 32, 32, 3]),
    "a shape of strings": infer_body(shape=["1", "32", "32", "3"]),
    "a zero batch": infer_body(shape=[0, 32, 32, 3], data=[]),
    "a huge datatype": infer_body(datatype="x" * 100_000),
    "two inputs": json.dumps({"inputs": [{}, {}]}).encode(),
    "inputs not a list": b'{"inputs": {"name": "images"}}',
}


def test_open_inference_protocol_answers_any_hostile_body_with_a_json_4xx(server):
    for name, body in HOSTILE.items():
        status, answer = call(f"{server}/v2/models/cnnpipe-test/infer", body, "application/json")
        assert status == 400, (name, status, answer)
        assert "\n" not in answer["error"] and len(answer["error"]) < 200, (name, answer)
    metrics = urllib.request.urlopen(f"{server}/metrics", timeout=30).read().decode()
    assert 'status="500"' not in metrics


def test_the_service_gives_back_the_memory_of_a_large_request(model_path):
    import psutil

    from cnnpipe.base.localhost import free_port, wait_for_http

    port = free_port()
    service = subprocess.Popen(
        [str(Path(sys.executable).parent / "cnnpipe"), "serve", str(model_path), "--port",
         str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health/ready", service, "cnnpipe serve", deadline_s=60)

        def infer(n: int) -> int:
            images = np.random.default_rng(n).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            tensor = {"name": "images", "shape": [n, 32, 32, 3], "datatype": "UINT8"}
            body = {"inputs": [{**tensor, "data": images.reshape(-1).tolist()}]}
            data = json.dumps(body, separators=(",", ":")).encode()
            return call(f"{url}/v2/models/cnnpipe-test/infer", data, "application/json")[0]

        process = psutil.Process(service.pid)
        assert infer(1) == 200
        idle = process.memory_info().rss
        # 900 images: a 9.9 MB body, just under the 10 MB limit.
        assert infer(900) == 200
        grown = (process.memory_info().rss - idle) / 1e6
        # onnxruntime's arena alone kept about 180 MB of the large batch's activations.
        assert grown < 60, f"{grown:.0f} MB kept after the request"
    finally:
        service.terminate()
        service.wait(timeout=30)


def start_workers(model_path: Path, tmp_path: Path) -> tuple[subprocess.Popen, str, list[int]]:
    """`cnnpipe serve --workers 2` with its temporary files under tmp_path, once both workers
    answer: the service, its URL and the workers' pids."""
    from cnnpipe.base.localhost import free_port, wait_for_http

    port = free_port()
    command = [str(Path(sys.executable).parent / "cnnpipe"), "serve", str(model_path)]
    service = subprocess.Popen(
        [*command, "--port", str(port), "--workers", "2"], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health/ready", service, "cnnpipe serve", deadline_s=60)

    # Each worker keeps its metrics in files named with its pid (counter_<pid>.db), from its start.
    def pids() -> set[int]:
        return {int(f.stem.split("_")[-1]) for f in tmp_path.glob("cnnpipe-metrics-*/*.db")}

    wait_until("both workers started", lambda: len(pids()) == 2, 60)
    return service, url, sorted(pids())


def test_worker_processes_share_the_port_the_metrics_and_the_stop(tmp_path):
    import psutil

    model_path = export_random_model(tmp_path / "model.onnx", CLASSES, ("image",))
    rng = np.random.default_rng(0)
    with_reference(model_path, rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8))
    service, url, _ = start_workers(model_path, tmp_path)
    try:
        children = psutil.Process(service.pid).children(recursive=True)
        image = png(np.full((32, 32, 3), 7, dtype=np.uint8))
        with ThreadPoolExecutor(8) as pool:
            sent = [pool.submit(call, f"{url}/predict", image, "image/png") for _ in range(40)]
        assert [future.result()[0] for future in sent] == [200] * 40
        # Whichever worker answers /metrics counts the requests of both, and measures the drift
        # of both workers' answers: 40 dark images against the noise the reference saw.
        for _ in range(4):
            metrics = samples(url)
            assert metrics[("cnnpipe_images_classified_total", ())] == 40
            assert metrics[("cnnpipe_drift_window_images", ())] == 40
            assert metrics[("cnnpipe_drift_brightness_red", ())] > 1
        service.terminate()
        assert service.wait(timeout=30) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, "every process of the service ended"
        assert not list(tmp_path.glob("cnnpipe-metrics-*")), "the metrics' files removed"
    finally:
        service.kill()
        service.wait(timeout=30)


def test_a_worker_that_dies_stops_the_service_in_one_line(model_path, tmp_path):
    import psutil

    service, _, workers = start_workers(model_path, tmp_path)
    try:
        children = psutil.Process(service.pid).children(recursive=True)
        psutil.Process(workers[0]).kill()
        assert service.wait(timeout=30) == 1
        said = service.stderr.read().strip().splitlines()[-1]
        assert said == (
            f"cnnpipe serve: error: worker process {workers[0]} was killed by signal 9, so the "
            "service stopped"
        )
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, "the other worker ended too"
    finally:
        service.kill()
        service.wait(timeout=30)


def test_workers_on_a_port_in_use_are_refused_in_one_line(model_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        command = [str(Path(sys.executable).parent / "cnnpipe"), "serve", str(model_path)]
        result = subprocess.run([*command, "--port", str(port), "--workers", "2"],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        f"cnnpipe serve: error: cannot listen on 127.0.0.1:{port} (Address already in use): "
        "choose another --port or --host\n"
    )


def test_workers_on_a_host_that_does_not_resolve_are_refused_in_one_line(model_path):
    command = [str(Path(sys.executable).parent / "cnnpipe"), "serve", str(model_path)]
    result = subprocess.run([*command, "--host", "nonexistent.invalid", "--workers", "2"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        "cnnpipe serve: error: cannot listen on nonexistent.invalid:8000 (the host does not "
        "resolve): choose another --port or --host\n"
    )

"""The HTTP service, started with uvicorn on a free local port and called over real HTTP."""

import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import uvicorn
from PIL import Image

from cnnpipe.predict import Classifier
from cnnpipe.serve import create_app
from conftest import export_random_model

CLASSES = [f"class{i}" for i in range(10)]
LIMIT = 200_000
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    return export_random_model(path, CLASSES, tta_flip=False)


@pytest.fixture(scope="module")
def server(model_path):
    app = create_app(str(model_path), LIMIT, top_k=2, body_timeout_s=TIMEOUT_S)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def call(url: str, data: bytes | None = None, content_type: str | None = None):
    headers = {"Content-Type": content_type} if content_type else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers)) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "cnnpipe-test-boundary"
    body = b""
    for name, data in files:
        head = f'Content-Disposition: form-data; name="file"; filename="{name}"'
        body += f"--{boundary}\r\n{head}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_health_and_metadata(server):
    assert call(f"{server}/health") == (200, {"status": "ok"})
    status, meta = call(f"{server}/metadata")
    assert status == 200 and meta["class_names"] == CLASSES and meta["max_body_bytes"] == LIMIT


def test_raw_image_gets_the_models_probabilities(server, model_path):
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    status, answer = call(f"{server}/predict", png(pixels), "image/png")
    assert status == 200
    (prediction,) = answer["predictions"]
    probs = Classifier.load(model_path).probabilities(pixels[None])[0]
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
    answer = stalled.recv(4096).decode()
    stalled.close()
    assert answer.startswith("HTTP/1.1 408") and "not received within 1 s" in answer
    assert TIMEOUT_S <= time.perf_counter() - start < TIMEOUT_S + 5


def test_many_files_at_once_are_served_up_to_the_part_limit(server):
    small = png(np.full((8, 8, 3), 200, dtype=np.uint8))
    status, answer = call(
        f"{server}/predict", *multipart([(f"{i}.png", small) for i in range(256)])
    )
    assert status == 200 and len(answer["predictions"]) == 256
    status, answer = call(f"{server}/predict", *multipart([("x.png", small)] * 257))
    assert status == 400 and "Too many files" in answer["error"]

"""Tiny CIFAR-10 archives in the official layout, and a real HTTP server on 127.0.0.1."""

import hashlib
import http.server
import io
import json
import pickle
import shutil
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def batch_payload(n: int, seed: int) -> bytes:
    """A batch whose class is visible in the pixels, so a model can learn something from it."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    data = rng.integers(0, 64, (n, 3072), dtype=np.uint8)
    data += (labels[:, None] * 19).astype(np.uint8)
    entry = {
        "batch_label": f"batch {seed}",
        "labels": labels.tolist(),
        "data": data,
        "filenames": [f"{i}.png" for i in range(n)],
    }
    return pickle.dumps(entry, protocol=4)


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def make_archive(path: Path, per_batch: int = 40, test: int = 50, extra=None) -> str:
    """Write a CIFAR-10 archive with 5 x `per_batch` training and `test` test images; return md5."""
    with tarfile.open(path, "w:gz") as tar:
        for k in range(1, 6):
            add_member(tar, f"cifar-10-batches-py/data_batch_{k}", batch_payload(per_batch, k))
        add_member(tar, "cifar-10-batches-py/test_batch", batch_payload(test, 0))
        meta = {"label_names": CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}
        add_member(tar, "cifar-10-batches-py/batches.meta", pickle.dumps(meta, protocol=4))
        if extra:
            extra(tar)
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def archive(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "cifar-10-python.tar.gz"
    return path, make_archive(path)


@pytest.fixture
def data_dir(tmp_path: Path, archive: tuple[Path, str]) -> Path:
    """The tiny archive, fetched by the fetch stage's own function."""
    from cnnpipe.fetch import fetch

    dest = tmp_path / "extracted" / "cifar-10-batches-py"
    fetch(str(archive[0]), archive[1], dest)
    return dest


# Small enough for seconds of training, large enough that a one-cycle schedule has its phases.
TINY = ["trainer.max_epochs=2", "trainer.batch_size=64", "data.val_size=40"]


@pytest.fixture
def project(tmp_path: Path, data_dir: Path, monkeypatch) -> tuple[Path, list[str]]:
    """A folder laid out like the repository, with conf/, a params.yaml for the tiny data and its
    own MLflow store (sqlite:///<folder>/mlflow.db); the tests run in it. Yields the folder and
    the overrides that made params.yaml."""
    from cnnpipe.config import compose_params

    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "conf", repo / "conf")
    monkeypatch.chdir(repo)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    tiny = [f"paths.data={data_dir}", *TINY, "trainer.progress_bar_refresh_rate=0"]
    (repo / "params.yaml").write_text(compose_params(tiny, conf_dir=repo / "conf"))
    return repo, tiny


def store(repo: Path):
    """The MLflow client of a `project` folder's store."""
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_server(tmp_path: Path):
    """Serve tmp_path/www over HTTP on a free port of 127.0.0.1; yields the base URL."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", root
    server.shutdown()
    server.server_close()


def export_random_model(path: Path, class_names: list[str], tta_flip: bool = True) -> Path:
    """The chapter's CNN with seeded random weights, exported as the pipeline exports it."""
    import torch

    from cnnpipe.export import export_onnx
    from cnnpipe.module import ImageClassifier, Predictor

    torch.manual_seed(0)
    net = {"_target_": "cnnpipe.models.ChapterCNN"}
    module = ImageClassifier(net, class_names, [0.5] * 3, [0.25] * 3)
    metadata = {
        "class_names": json.dumps(class_names),
        "model_name": "cnnpipe-test",
        "test_accuracy": "0.5",
        "tta_flip": str(tta_flip).lower(),
    }
    export_onnx(Predictor(module, tta_flip), path, 18, metadata, [1])
    return path


def foreign_model(path: Path, class_names: list[str]) -> Path:
    """A valid ONNX model with cnnpipe's metadata that takes (N, classes) floats, not images."""
    import onnx
    from onnx import TensorProto, helper

    shape = ["N", len(class_names)]
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"])],
        "foreign",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    helper.set_model_props(model, {"class_names": json.dumps(class_names)})
    onnx.save(model, path)
    return path

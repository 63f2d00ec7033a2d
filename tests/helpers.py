"""Helpers the tests share: tiny CIFAR-10 archives in the official layout, small ONNX models,
free ports, composed configs. Fixtures are in conftest.py."""

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import http.server
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import optuna
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from cnnpipe.artifact.contract import Metadata
from cnnpipe.base.config import compose_params
from cnnpipe.data.cifar import ARCHIVE_DIR, META, TEST_BATCH, TRAIN_BATCHES
from cnnpipe.tracking.lineage import recipe_params
from cnnpipe.training import build
from cnnpipe.training.classifier import untrained

ROOT = Path(__file__).resolve().parents[1]


def shipped_conf(dest: Path) -> Path:
    """conf/ as committed, copied into `dest`: without this machine's git-ignored conf/local/,
    which no test may read."""
    shutil.copytree(ROOT / "conf", dest / "conf", ignore=shutil.ignore_patterns("local"))
    return dest / "conf"


# What the tests compose: one copy per test process.
CONF = shipped_conf(Path(tempfile.mkdtemp(prefix="cnnpipe-conf-")))
atexit.register(shutil.rmtree, CONF.parent, ignore_errors=True)
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cnnpipe(
    *args: str,
    cwd: Path | None = None,
    env: dict | None = None,
    timeout: float = 600,
    check: bool = False,
    background: bool = False,
    **popen,
) -> subprocess.CompletedProcess | subprocess.Popen:
    """`cnnpipe ARGS` as a user runs it (the installed console script), output as text. Configs
    may name classes in tests/ (PYTHONPATH). `check`: the command must succeed; `background`:
    the running process, in a session of its own so that a test can kill its whole group."""
    command = [str(Path(sys.executable).parent / "cnnpipe"), *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    if background:
        return subprocess.Popen(command, cwd=cwd, env=env, start_new_session=True, **popen)
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **popen
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


# The tiny data's training set has 160 images: a fixed batch and warm-up keep the one-cycle
# schedule's phases apart; the search varies the rest.
SEARCH = [
    "hparams_search=chapter_cnn", "loader.batch_size=64", "optim.pct_start=0.25",
    "hydra.sweeper.study_name=test",
]  # fmt: skip


def composed(*overrides: str, conf_dir: Path = CONF) -> DictConfig:
    """conf/ composed with `overrides`, as `cnnpipe params` writes it."""
    return OmegaConf.create(compose_params(list(overrides), conf_dir=conf_dir))


@functools.cache
def defaults() -> DictConfig:
    """conf/'s default, for the values tests share with the pipeline (opset, parity.atol)."""
    return composed()


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
        for k, name in enumerate(TRAIN_BATCHES, 1):
            add_member(tar, f"{ARCHIVE_DIR}/{name}", batch_payload(per_batch, k))
        add_member(tar, f"{ARCHIVE_DIR}/{TEST_BATCH}", batch_payload(test, 0))
        meta = {"label_names": CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}
        add_member(tar, f"{ARCHIVE_DIR}/{META}", pickle.dumps(meta, protocol=4))
        if extra:
            extra(tar)
    return hashlib.md5(path.read_bytes()).hexdigest()


# Small enough for seconds of training, large enough that a one-cycle schedule has its phases.
TINY = ["trainer.max_epochs=2", "loader.batch_size=64", "data.val_size=40"]


def store(repo: Path):
    """The MLflow client of a `project` folder's store."""
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def export_random_model(
    path: Path,
    class_names: list[str],
    views: tuple[str, ...] = ("image", "mirror"),
    image_size: int = 32,
) -> Path:
    """The chapter's CNN with seeded random weights, exported as the pipeline exports it."""
    from cnnpipe.artifact.onnx_export import export_onnx
    from cnnpipe.training.inference import TorchModel

    metadata = Metadata(class_names, "cnnpipe-test", 0.5, views)
    model = TorchModel(untrained(class_names, image_size=image_size), views)
    cfg = defaults()
    export_onnx(model, path, metadata, cfg.export.opset, cfg.parity.atol, [1])
    return path


def with_reference(path: Path, images: np.ndarray) -> dict:
    """Give the exported model at `path` the drift reference of its answers to `images`, as
    evaluate and export would: the reference."""
    import onnx

    from cnnpipe.data import drift
    from cnnpipe.serving.onnx_model import OnnxModel

    model = OnnxModel.load(path)
    reference = drift.reference(images, model.probabilities(images))
    proto = onnx.load(path)
    metadata = dataclasses.replace(model.metadata, drift_reference=reference)
    onnx.helper.set_model_props(proto, metadata.to_props(model.size))
    onnx.save(proto, path)
    return reference


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
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", defaults().export.opset)]
    )
    helper.set_model_props(model, {"class_names": json.dumps(class_names)})
    onnx.save(model, path)
    return path


class PruneOddTrials(optuna.pruners.BasePruner):
    """An Optuna pruner that prunes every odd-numbered trial at its first report: a search that
    must prune, so that a test of pruning cannot pass by luck."""

    def __init__(self, **_) -> None:
        pass

    def prune(self, study, trial) -> bool:
        return trial.number % 2 == 1


class Rendezvous(pl.Callback):
    """Holds each training at its start until `parties` trainings have started, or fails it after
    `deadline_s`: jobs that pass it ran at the same time, whatever the machine's speed."""

    def __init__(self, folder: str, parties: int = 2, deadline_s: float = 300) -> None:
        self.folder, self.parties, self.deadline_s = Path(folder), parties, deadline_s

    def on_train_start(self, trainer, pl_module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / str(os.getpid())).touch()
        deadline = time.monotonic() + self.deadline_s
        while len(list(self.folder.iterdir())) < self.parties:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no other training started within {self.deadline_s} s")
            time.sleep(0.1)


class WeightsDigest(pl.Callback):
    """Prints, when fitting ends, `RANK <rank> <world size> <batches per epoch> <sha256 of the
    weights>` for each process, so a test can compare what every DDP rank ended with: the
    weights the checkpoint holds (weight averaging puts its average in place at train end)."""

    def on_fit_end(self, trainer, pl_module) -> None:
        weights = b"".join(p.detach().cpu().numpy().tobytes() for p in pl_module.parameters())
        digest = hashlib.sha256(weights).hexdigest()
        line = f"RANK {trainer.global_rank} {trainer.world_size} {trainer.num_training_batches} "
        # One write, which a pipe keeps whole: the ranks share the terminal.
        sys.stdout.flush()
        os.write(sys.stdout.fileno(), f"{line}{digest}\n".encode())


def ranks(output: str) -> dict[str, list[str]]:
    """WeightsDigest's lines in `output`: [world size, batches, digest] by rank."""
    found = re.findall(r"RANK (\d+) (\d+) (\d+) ([0-9a-f]{64})", output)
    return {rank: list(rest) for rank, *rest in found}


class HoldOnce(pl.Callback):
    """At the first batch of epoch `epoch` (0-based), the first time only (`folder`/held marks
    it), holds training until the process is told to stop (SIGTERM, as SLURM does on a requeue)
    or `deadline_s` passes: a test can interrupt it between two epochs, whatever the speed."""

    def __init__(self, folder: str, epoch: int = 1, deadline_s: float = 120) -> None:
        self.marker, self.epoch, self.deadline_s = Path(folder) / "held", epoch, deadline_s

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch != self.epoch or batch_idx or self.marker.exists():
            return
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.touch()
        deadline = time.monotonic() + self.deadline_s
        while not trainer.received_sigterm:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not stopped within {self.deadline_s} s")
            time.sleep(0.1)


def make_image_folder(
    root: Path,
    classes: list[str],
    per_class: int,
    size: tuple[int, int] = (40, 56),
    fmt: str = "PNG",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write `per_class` images of each class to root/<class>/<i>.<fmt>, each with its class in
    its colour so that a model can learn it; returns the pixels written, by path under root."""
    rng = np.random.default_rng(seed)
    written = {}
    suffix = {"JPEG": "jpg", "TIFF": "tif"}.get(fmt, fmt.lower())
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 64, (*size, 3), dtype=np.uint8)
            pixels[..., label % 3] += np.uint8(40 + 60 * (label // 3) % 190)
            path = root / name / f"{i}.{suffix}"
            Image.fromarray(pixels).save(path, fmt)
            written[path.relative_to(root).as_posix()] = pixels
    return written


def folder_config(source: Path, *overrides: str, prepared: Path | None = None) -> DictConfig:
    """conf/ with data=folder reading `source`, written to `prepared` when given."""
    paths = [f"paths.data={prepared}"] if prepared else []
    return composed("data=folder", f"data.source={source}", *paths, *overrides)


def copy_repo(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in files:
        if (ROOT / name).is_file() and not name.startswith((".dvc/tmp", "dvc.lock")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def repo_env(repo: Path) -> dict[str, str]:
    """The environment a user's shell gives `dvc` and `git` in the copy `repo`: the project's
    console scripts, its sources, no MLflow or DVC settings of the caller's, a git identity."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(repo / "src"),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }


def keras_chapter_params(size: int, classes: int) -> int:
    """What Keras' model.summary() prints for the chapter's CNN on (size, size, 3), by hand."""
    side = size
    total = 0
    for c_in, c_out, pool in ((3, 32, True), (32, 64, True), (64, 64, False)):
        side -= 2
        total += 3 * 3 * c_in * c_out + c_out
        side = side // 2 if pool else side
    return total + (side * side * 64) * 64 + 64 + 64 * classes + classes


@contextlib.contextmanager
def folder_over_http(root: Path) -> Iterator[str]:
    """`root` served over HTTP on a free port of 127.0.0.1; yields the base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def trained_params(cfg: DictConfig) -> dict[str, str]:
    """The params a training run logs: its recipe, and the precision trainer.precision chose on
    this machine."""
    return {**recipe_params(cfg), "trainer.precision_used": build.precision(cfg)}


def compose_for(run) -> DictConfig:
    """The composed config that a sweep's child run's params must mirror key for key."""
    overrides = run.data.tags["sweep.overrides"].split()
    return OmegaConf.create(compose_params(overrides, conf_dir=Path("conf")))


# Calls to the service, as a client makes them.


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def call(url: str, data: bytes | None = None, content_type: str | None = None):
    headers = {"Content-Type": content_type} if content_type else {}
    try:
        request = urllib.request.Request(url, data=data, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def samples(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def fault_lines(what: str) -> list[re.Pattern]:
    """The lines that docs/scale-out.md's table of faults quotes for the fault `what` (its first
    cell), as patterns in which `...` stands for anything: the tests that produce each fault
    match what they read against them."""
    for row in (ROOT / "docs" / "scale-out.md").read_text().splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if row.startswith("|") and cells[0] == what:
            quoted = re.findall(r"`([^`]+)`", cells[1])
            return [re.compile(".*".join(map(re.escape, q.split("...")))) for q in quoted]
    raise KeyError(f"docs/scale-out.md has no fault {what!r}")

"""The HTTP service for the exported model, as a Starlette app (server.py runs it on uvicorn).

GET / is a page for people: choose or drop images, see their top classes. For programs: POST
/predict takes one image as the raw body (Content-Type image/* or application/octet-stream) or one
or more as multipart/form-data files; GET /metadata describes the model, /health/live and
/health/ready are the probes, /metrics is in Prometheus' text format, /openapi.json the API, and
/v2/... the Open Inference Protocol (KServe v2: open_inference.py).
Errors are JSON: 404 and 405 for other routes and methods, 413 for bodies over the limit, 408 for
requests whose headers or body do not arrive in time (slow or stalled clients), 415 for other
content types, 400 for bad images.
"""

import asyncio
import contextlib
import hashlib
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.applications import Starlette
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.schemas import SchemaGenerator

from cnnpipe import PipelineError
from cnnpipe.artifact import contract
from cnnpipe.data.images import decode
from cnnpipe.serving import open_inference
from cnnpipe.serving.batching import Batcher
from cnnpipe.serving.capture import Capture, Settings
from cnnpipe.serving.drift import DriftGauges, Window
from cnnpipe.serving.follow import read_pointer
from cnnpipe.serving.http import EXCEPTION_HANDLERS, RequestError, error, read_body
from cnnpipe.serving.metrics import Metrics
from cnnpipe.serving.onnx_model import OnnxModel, checked_model

PAGE = files("cnnpipe.serving").joinpath("page.html").read_text()
# What cnnpipe_model_info labels the model by, from its metadata.
MODEL_KEYS = ("name", "version", "file", "sha256", "test_accuracy")
# How often a worker looks at the pointer the alias follower writes (follow.py).
POINTER_POLL_S = 0.5


async def multipart_files(request: Request, body: bytes) -> list[tuple[str, bytes]]:
    """The file parts of a multipart body as (file name, bytes); RequestError 400 if it has none
    or is not multipart."""

    async def chunks():
        yield body

    parser = MultiPartParser(request.headers, chunks(), max_files=256, max_fields=256)
    try:
        form = await parser.parse()
    except MultiPartException as reason:
        raise RequestError(400, f"bad multipart body: {reason}") from None
    files = [
        (part.filename or name, await part.read())
        for name, part in form.multi_items()
        if not isinstance(part, str)
    ]
    if not files:
        raise RequestError(400, "multipart body has no file parts")
    return files


def decode_all(
    files: list[tuple[str, bytes]], size: tuple[int, int]
) -> tuple[np.ndarray, list[str]]:
    """The images at `size`, stacked, and a note for each; ValueError names the first bad file."""
    images, notes = [], []
    for name, data in files:
        try:
            image, note = decode(data, size)
        except ValueError as reason:
            raise ValueError(f"{name}: {reason}") from None
        images.append(image)
        notes.append(note)
    return np.stack(images), notes


def model_metadata(path: str, model: OnnxModel, registered: dict | None) -> dict:
    """What /metadata and the page say about the model: from the file `cnnpipe export` wrote, and
    for a registered version its name, version and alias."""
    meta = model.metadata
    registered = registered or {}
    return {
        "name": registered.get("name", meta.model_name),
        "dataset": meta.dataset,
        "version": registered.get("version"),
        "alias": registered.get("alias"),
        "test_accuracy": meta.test_accuracy,
        "tta_views": list(meta.tta_views),
        "tta_shift": meta.tta_shift,
        "file": path,
        "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        "mlflow_run_id": meta.mlflow_run_id,
        "git_commit": meta.git_commit,
        "input": {
            "name": contract.INPUT_NAME,
            "datatype": contract.INPUT_DTYPE.name,
            "shape": list(contract.input_shape(-1, model.size)),
        },
        "output": {
            "name": contract.OUTPUT_NAME,
            "datatype": contract.OUTPUT_DTYPE.name,
            "shape": [-1, len(model.class_names)],
        },
    }


@dataclass
class Limits:
    """What the service takes and how it batches: `cnnpipe serve`'s options."""

    max_body_bytes: int = 10 << 20
    top_k: int = 3
    body_timeout_s: float = 10
    # Requests gathered into one model call, how long the first waits for others, and how many
    # may wait before more are answered 503.
    max_batch: int = 64
    batch_window_s: float = 0.0
    max_queue: int = 256
    # The answered images the drift gauges compare with the model's reference (0: no gauges).
    drift_window: int = 1000


@dataclass
class Service:
    """What the handlers share: the model and its batcher, what is said about the model, the
    limits, the metrics (made in `registry`, shown from `exposition`), the drift gauges, what
    keeps answered images when --capture asks for it, and the pointer to follow for a registry
    alias."""

    model: OnnxModel
    batcher: Batcher
    metadata: dict
    limits: Limits
    registry: CollectorRegistry
    exposition: CollectorRegistry
    images_classified: Counter
    model_info: Gauge
    swaps: Counter
    drift: DriftGauges | None = None
    capture: Capture | None = None
    pointer: Path | None = None

    @contextlib.asynccontextmanager
    async def running(self, _: object = None) -> AsyncIterator[None]:
        """The batcher's worker, and the pointer's watcher, while the app runs (a Starlette
        lifespan); then what capture has queued is written."""
        async with self.batcher.working():
            watcher = asyncio.create_task(self.follow()) if self.pointer else None
            try:
                yield
            finally:
                if watcher:
                    watcher.cancel()
        if self.capture:
            self.capture.close()

    async def follow(self) -> None:
        """Swap in the version the alias follower points at, whenever the pointer changes."""
        loop, seen = asyncio.get_running_loop(), None
        while True:
            await asyncio.sleep(POINTER_POLL_S)
            try:
                stamp = self.pointer.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            found = read_pointer(self.pointer) if stamp != seen else None
            seen = stamp
            if found and found[2]:
                self.swaps.labels("refused").inc()  # the follower said why, once
            elif found and found[1].get("version") != self.metadata["version"]:
                # In the batcher's one thread: between two batches, never during one.
                await loop.run_in_executor(self.batcher.thread, self.swap, *found[:2])

    def swap(self, path: str, registered: dict) -> None:
        """Serve the model at `path` from the next batch on, unless it does not load or would
        answer other classes or take another size: then the old one serves on."""
        version = registered.get("version")
        try:
            new = checked_model(path)
            if (new.class_names, new.size) != (self.model.class_names, self.model.size):
                raise PipelineError(
                    f"its classes or input size differ from version {self.metadata['version']}'s"
                )
        except PipelineError as problem:
            self.swaps.labels("refused").inc()
            print(f"cnnpipe serve: version {version} not swapped in: {problem}", file=sys.stderr)
            return
        self.model_info.labels(*info_labels(self.metadata)).set(0)
        self.model, self.metadata = new, model_metadata(path, new, registered)
        self.batcher.classify = new.probabilities
        if self.drift:
            self.drift.follow(new.metadata.drift_reference)
        self.model_info.labels(*info_labels(self.metadata)).set(1)
        if self.capture:
            self.capture.model = {k: self.metadata[k] for k in ("name", "version", "sha256")}
            self.capture.describe(new.size, new.metadata.drift_reference)
        self.swaps.labels("swapped").inc()
        print(f"cnnpipe serve: serving version {version}", file=sys.stderr, flush=True)


def info_labels(metadata: dict) -> list[str]:
    return ["" if metadata[k] is None else str(metadata[k]) for k in MODEL_KEYS]


def registries() -> tuple[CollectorRegistry, CollectorRegistry]:
    """Where the metrics are made and what /metrics shows: one registry in one process; under
    `cnnpipe serve --workers` (PROMETHEUS_MULTIPROC_DIR set), the files of every worker."""
    registry = CollectorRegistry()
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return registry, registry
    exposition = CollectorRegistry()
    MultiProcessCollector(exposition)
    return registry, exposition


def load(
    model_path: str,
    limits: Limits,
    registered: dict | None,
    keep: Settings | None,
    pointer: str | None,
) -> Service:
    onnx_model = checked_model(model_path)
    metadata = model_metadata(model_path, onnx_model, registered)
    registry, exposition = registries()
    images_classified = Counter("cnnpipe_images_classified", "Images classified", registry=registry)
    # A gauge of 1, as Prometheus' info metrics are: Info does not work across processes. A
    # swapped-out version's goes to 0.
    model_info = Gauge(
        "cnnpipe_model_info", "The model being served", MODEL_KEYS, registry=registry,
        multiprocess_mode="max",
    )  # fmt: skip
    model_info.labels(*info_labels(metadata)).set(1)
    swaps = Counter(
        "cnnpipe_model_swaps", "New versions of a followed alias: swapped in, or refused",
        ["outcome"], registry=registry,
    )  # fmt: skip
    drift = None
    if limits.drift_window:
        drift = DriftGauges(Window(limits.drift_window), onnx_model.metadata.drift_reference)
        exposition.register(drift)
    batcher = Batcher(
        onnx_model.probabilities,
        limits.max_batch,
        limits.batch_window_s,
        limits.max_queue,
        registry,
        drift and drift.observe,
    )
    capture = None
    if keep:
        capture = Capture(keep, metadata, onnx_model.class_names, registry)
        capture.describe(onnx_model.size, onnx_model.metadata.drift_reference)
    return Service(
        model=onnx_model,
        batcher=batcher,
        metadata=metadata,
        limits=limits,
        registry=registry,
        exposition=exposition,
        images_classified=images_classified,
        model_info=model_info,
        swaps=swaps,
        drift=drift,
        capture=capture,
        pointer=Path(pointer) if pointer else None,
    )


def service_of(request: Request) -> Service:
    return request.app.state.service


async def page(_: Request) -> HTMLResponse:
    return HTMLResponse(PAGE)


async def live(_: Request) -> JSONResponse:
    """
    ---
    summary: Liveness probe
    description: 200 while the process answers requests.
    responses:
      200:
        description: The process is alive.
    """
    return JSONResponse({"status": "alive"})


async def ready(request: Request) -> JSONResponse:
    """
    ---
    summary: Readiness probe
    description: >-
      200 once the model is loaded and has run one inference, which happens before the port
      opens; /health answers the same.
    responses:
      200:
        description: Ready to classify; names the model.
    """
    model = service_of(request).metadata
    fields = {"model": model["name"], "version": model["version"], "sha256": model["sha256"]}
    return JSONResponse({"status": "ready", **fields})


async def metadata(request: Request) -> JSONResponse:
    """
    ---
    summary: The model and what it takes
    responses:
      200:
        description: >-
          The model's name, version and alias when registered, test accuracy, class names
          and input and output specification.
    """
    service = service_of(request)
    height, width = service.model.size
    return JSONResponse(
        {
            "model": service.metadata,
            "class_names": service.model.class_names,
            "request": f"image files; each is converted to RGB and resized to {width}x{height}",
            "max_body_bytes": service.limits.max_body_bytes,
            "top_k": service.limits.top_k,
        }
    )


async def predict(request: Request) -> JSONResponse:
    """
    ---
    summary: Classify images
    description: >-
      One image as the raw body (Content-Type image/* or application/octet-stream), or one
      or more as multipart/form-data file parts.
    requestBody:
      required: true
      content:
        image/*:
          schema: {type: string, format: binary}
        multipart/form-data:
          schema:
            type: object
            properties:
              file: {type: array, items: {type: string, format: binary}}
    responses:
      200:
        description: >-
          predictions, one per image in order, each with file, top_k (label and
          probability, most probable first) and a note when the image was resized.
      400: {description: An unreadable image or multipart body.}
      408: {description: The request did not arrive in time.}
      413: {description: The body is over max_body_bytes.}
      415: {description: Another content type.}
      503: {description: Too many requests are waiting; retry shortly.}
    """
    service = service_of(request)
    limits = service.limits
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = kind == "multipart/form-data"
    if not (multipart or kind.startswith("image/") or kind == "application/octet-stream"):
        return error(
            415, "send an image (image/*, application/octet-stream) or multipart/form-data"
        )
    body = await read_body(request, limits.max_body_bytes, limits.body_timeout_s)
    files = await multipart_files(request, body) if multipart else [("body", body)]
    # Decoded in the batcher's thread: a large JPEG must not stall every other connection.
    try:
        probs, notes = await service.batcher.run(lambda: decode_all(files, service.model.size))
    except ValueError as reason:
        return error(400, str(reason))
    service.images_classified.inc(len(probs))
    if service.capture:
        service.capture.offer([data for _, data in files], probs, "/predict")
    top = service.model.top_k(probs, limits.top_k)
    predictions = [
        {"file": name, "top_k": [{"label": c, "probability": p} for c, p in best], "note": note}
        for (name, _), best, note in zip(files, top, notes, strict=True)
    ]
    return JSONResponse({"predictions": predictions})


SCHEMAS = SchemaGenerator(
    {"openapi": "3.0.0", "info": {"title": "cnnpipe image classifier", "version": "1"}}
)


async def openapi(_: Request) -> JSONResponse:
    return JSONResponse(SCHEMAS.get_schema(ROUTES))


async def metrics(request: Request) -> Response:
    return Response(generate_latest(service_of(request).exposition), media_type=CONTENT_TYPE_LATEST)


ROUTES: list[BaseRoute] = [
    Route("/", page, include_in_schema=False),
    Route("/health/live", live),
    Route("/health/ready", ready),
    Route("/health", ready, include_in_schema=False),
    Route("/metadata", metadata),
    Route("/predict", predict, methods=["POST"]),
    Route("/openapi.json", openapi, include_in_schema=False),
    Route("/metrics", metrics, include_in_schema=False),
    *open_inference.ROUTES,
]


def create_app(
    model_path: str,
    limits: Limits | None = None,
    registered: dict | None = None,
    keep: Settings | None = None,
    pointer: str | None = None,
) -> Starlette:
    """The service for the ONNX file at `model_path`; `registered` names its registry version,
    `keep` says what answered images to capture, `pointer` is the file the alias follower writes
    when the alias moves (follow.py)."""
    service = load(model_path, limits or Limits(), registered, keep, pointer)
    app = Starlette(routes=ROUTES, exception_handlers=EXCEPTION_HANDLERS, lifespan=service.running)
    app.state.service = service
    app.add_middleware(Metrics, registry=service.registry, routes=ROUTES)
    return app

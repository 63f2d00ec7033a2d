"""`cnnpipe serve MODEL`: an HTTP service for the exported model (Starlette on uvicorn).

MODEL is the ONNX file or a registered version: models:/NAME/VERSION or models:/NAME@ALIAS.

GET / is a page for people: choose or drop images, see their top classes. For programs: POST
/predict takes one image as the raw body (Content-Type image/* or application/octet-stream) or one
or more as multipart/form-data files; GET /metadata describes the model, /health/live and
/health/ready are the probes, /metrics is in Prometheus' text format, /openapi.json the API, and
/v2/... the Open Inference Protocol (KServe v2: open_inference.py).
Errors are JSON: 404 and 405 for other routes and methods, 413 for bodies over the limit, 408 for
requests whose headers or body do not arrive in time (slow or stalled clients), 415 for other
content types, 400 for bad images.
Like predict, it imports no torch, Lightning or MLflow (MLflow only to fetch a models:/ URI).
"""

import argparse
import asyncio
import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path

import h11
import numpy as np
import uvicorn
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Match, Route
from starlette.schemas import SchemaGenerator
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from cnnpipe import PipelineError, open_inference
from cnnpipe.http_body import BodyTooLarge, error, read_body
from cnnpipe.predict import SIZE, Classifier, decode

PAGE = files("cnnpipe").joinpath("page.html").read_text()


async def parse_multipart(request: Request, body: bytes) -> FormData:
    async def chunks():
        yield body

    return await MultiPartParser(request.headers, chunks(), max_files=256, max_fields=256).parse()


def decode_all(files: list[tuple[str, bytes]]) -> tuple[np.ndarray, list[str]]:
    """The images stacked, and a note for each; ValueError names the first bad file."""
    images, notes = [], []
    for name, data in files:
        try:
            image, note = decode(data)
        except ValueError as reason:
            raise ValueError(f"{name}: {reason}") from None
        images.append(image)
        notes.append(note)
    return np.stack(images), notes


def fetch_registered(uri: str) -> tuple[str, dict[str, str | None]]:
    """models:/NAME/VERSION or models:/NAME@ALIAS -> the version's ONNX file, downloaded from the
    MLflow store (MLFLOW_TRACKING_URI, else ./mlflow.db as the pipeline's default), and its
    name, version and alias."""
    import mlflow  # here only: serving a file needs no MLflow

    from cnnpipe.tracking import store_errors, tracking_uri

    name, at, alias = uri.removeprefix("models:/").partition("@")
    name, _, number = (name, "", "") if at else name.rpartition("/")
    if not name or not (alias or number):
        raise PipelineError(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
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
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            reason = error.message.splitlines()[0]
            raise PipelineError(f"{uri}: {reason} in {mlflow.get_tracking_uri()}") from None
        folder = mlflow.artifacts.download_artifacts(f"models:/{name}/{found.version}")
    return str(Path(folder) / "model.onnx"), {
        "name": name,
        "version": str(found.version),
        "alias": alias or (found.aliases[0] if found.aliases else None),
    }


def model_metadata(path: str, classifier: Classifier, registered: dict | None) -> dict:
    """What /metadata and the page say about the model: from the file `cnnpipe export` wrote, and
    for a registered version its name, version and alias."""
    meta = classifier.session.get_modelmeta().custom_metadata_map
    (input_,), (output,) = classifier.session.get_inputs(), classifier.session.get_outputs()
    accuracy = meta.get("test_accuracy")
    registered = registered or {}
    return {
        "name": registered.get("name", meta.get("model_name")),
        "version": registered.get("version"),
        "alias": registered.get("alias"),
        "test_accuracy": float(accuracy) if accuracy else None,
        "tta_flip": meta.get("tta_flip") == "true",
        "tta_shift": int(meta.get("tta_shift", 0)),
        "file": path,
        "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        "mlflow_run_id": meta.get("mlflow_run_id"),
        "git_commit": meta.get("git_commit"),
        "input": {"name": input_.name, "datatype": "uint8", "shape": [-1, SIZE, SIZE, 3]},
        "output": {
            "name": output.name,
            "datatype": "float32",
            "shape": [-1, len(classifier.class_names)],
        },
    }


class Metrics:
    """ASGI middleware counting requests by route, method and status, with their latency.

    Routes are labelled by their template and unknown paths as "other", so a scanner trying
    thousands of URLs cannot grow the label set.
    """

    def __init__(self, app: ASGIApp, registry: CollectorRegistry, routes: list[Route]) -> None:
        self.app, self.routes = app, routes
        self.requests = Counter(
            "cnnpipe_http_requests",
            "HTTP requests by route, method and status code",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "cnnpipe_http_request_duration_seconds",
            "Time from the request's arrival to its last response byte",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = next(
            (r.path for r in self.routes if r.matches(scope)[0] is not Match.NONE), "other"
        )
        status = 500  # what the client gets if the app raises before answering
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.requests.labels(route, scope["method"], str(status)).inc()
            self.latency.labels(route).observe(time.perf_counter() - start)


def create_app(
    model_path: str,
    max_body_bytes: int = 10 << 20,
    top_k: int = 3,
    body_timeout_s: float = 10,
    registered: dict | None = None,
) -> Starlette:
    """The service for the ONNX file at `model_path`; `registered` names its registry version."""
    classifier = Classifier.load(model_path)
    # One inference before the port opens: a model that loads but cannot run fails here, at
    # start, and the first request does not pay for onnxruntime's first-run allocations.
    try:
        classifier.probabilities(np.zeros((1, SIZE, SIZE, 3), np.uint8))
    except Exception as failure:  # onnxruntime raises its own untyped exceptions
        text = str(failure).strip()
        reason = text.splitlines()[0] if text else repr(failure)
        raise PipelineError(f"{model_path} loads but does not run ({reason})") from None
    model = model_metadata(model_path, classifier, registered)
    registry = CollectorRegistry()
    images_classified = Counter("cnnpipe_images_classified", "Images classified", registry=registry)
    Info("cnnpipe_model", "The model being served", registry=registry).info(
        {
            k: "" if model[k] is None else str(model[k])
            for k in ("name", "version", "file", "sha256", "test_accuracy")
        }
    )
    schemas = SchemaGenerator(
        {
            "openapi": "3.0.0",
            "info": {"title": "cnnpipe image classifier", "version": "1"},
        }
    )

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

    async def ready(_: Request) -> JSONResponse:
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
        return JSONResponse({"status": "ready", "model": model["name"], "sha256": model["sha256"]})

    async def metadata(_: Request) -> JSONResponse:
        """
        ---
        summary: The model and what it takes
        responses:
          200:
            description: >-
              The model's name, version and alias when registered, test accuracy, class names
              and input and output specification.
        """
        return JSONResponse(
            {
                "model": model,
                "class_names": classifier.class_names,
                "request": f"image files; each is converted to RGB and resized to {SIZE}x{SIZE}",
                "max_body_bytes": max_body_bytes,
                "top_k": top_k,
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
        """
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if kind.startswith("image/") or kind == "application/octet-stream":
                files = [("body", await read_body(request, max_body_bytes, body_timeout_s))]
            elif kind == "multipart/form-data":
                body = await read_body(request, max_body_bytes, body_timeout_s)
                form = await parse_multipart(request, body)
                files = [
                    (part.filename or name, await part.read())
                    for name, part in form.multi_items()
                    if not isinstance(part, str)
                ]
                if not files:
                    return error(400, "multipart body has no file parts")
            else:
                return error(
                    415, "send an image (image/*, application/octet-stream) or multipart/form-data"
                )
        except BodyTooLarge:
            return error(413, f"body over {max_body_bytes} bytes")
        except TimeoutError:
            return error(408, f"body not received within {body_timeout_s:g} s")
        except MultiPartException as reason:
            return error(400, f"bad multipart body: {reason}")
        # Decoding runs in a worker thread: a large JPEG must not stall every other connection.
        try:
            images, notes = await run_in_threadpool(decode_all, files)
        except ValueError as reason:
            return error(400, str(reason))
        probs = await run_in_threadpool(classifier.probabilities, images)
        images_classified.inc(len(images))
        predictions = [
            {"file": name, "top_k": [{"label": c, "probability": p} for c, p in top], "note": note}
            for (name, _), top, note in zip(
                files, classifier.top_k(probs, top_k), notes, strict=True
            )
        ]
        return JSONResponse({"predictions": predictions})

    async def openapi(_: Request) -> JSONResponse:
        return JSONResponse(schemas.get_schema(routes))

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/", page, include_in_schema=False),
        Route("/health/live", live),
        Route("/health/ready", ready),
        Route("/health", ready, include_in_schema=False),
        Route("/metadata", metadata),
        Route("/predict", predict, methods=["POST"]),
        Route("/openapi.json", openapi, include_in_schema=False),
        Route("/metrics", metrics, include_in_schema=False),
        *open_inference.routes(classifier, model, max_body_bytes, body_timeout_s),
    ]

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        body = {"error": f"{exc.detail}; the routes are in /openapi.json"}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.add_middleware(Metrics, registry=registry, routes=routes)
    return app


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's headers: uvicorn closes a
    connection that stays silent, but not one that trickles its headers a byte at a time."""

    class HeaderTimeout(H11Protocol):
        timer: asyncio.TimerHandle | None = None

        def arm(self) -> None:
            self.disarm()
            self.timer = self.loop.call_later(seconds, self.headers_late)

        def disarm(self) -> None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
                self.disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():  # the next request on this connection
                self.arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm()
            super().connection_lost(exc)

        def headers_late(self) -> None:
            self.timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                message = f"request headers not received within {seconds:g} s".encode()
                self.transport.write(
                    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(message), message)
                )
                self.transport.close()

    return HeaderTimeout


def server(
    app: Starlette, host: str, port: int, header_timeout_s: float, log_level: str = "info"
) -> uvicorn.Server:
    protocol = header_timeout_protocol(header_timeout_s)
    config = uvicorn.Config(app, host=host, port=port, http=protocol, log_level=log_level)
    return uvicorn.Server(config)


@contextmanager
def running(app: Starlette, header_timeout_s: float = 10, start_s: float = 30) -> Iterator[str]:
    """The app on a free 127.0.0.1 port in a thread, for tests and benchmarks: its base URL."""
    service = server(app, "127.0.0.1", 0, header_timeout_s, log_level="warning")
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_s
    while not service.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise PipelineError(f"the service did not start within {start_s:g} s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{service.servers[0].sockets[0].getsockname()[1]}"
    finally:
        service.should_exit = True
        thread.join(timeout=10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cnnpipe serve", description=__doc__)
    parser.add_argument(
        "model", help="the exported ONNX file (models/model.onnx) or models:/NAME@ALIAS"
    )
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes it to the network")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-body-mb", type=float, default=10)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--body-timeout-s", type=float, default=10)
    parser.add_argument("--header-timeout-s", type=float, default=10)
    args = parser.parse_args(argv)
    max_body = int(args.max_body_mb * (1 << 20))
    path, registered = args.model, None
    if path.startswith("models:/"):
        path, registered = fetch_registered(path)
    app = create_app(path, max_body, args.top_k, args.body_timeout_s, registered)
    server(app, args.host, args.port, args.header_timeout_s).run()

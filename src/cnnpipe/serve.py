"""`cnnpipe serve MODEL.onnx`: an HTTP service for the exported model (Starlette on uvicorn).

POST /predict takes one image as the raw body (Content-Type image/* or application/octet-stream)
or one or more as multipart/form-data files; GET /health and GET /metadata describe the service.
Errors are JSON: 413 for bodies over the limit, 408 for bodies that do not arrive in time (slow
or stalled clients), 415 for other content types, 400 for bad images.
Like predict, it imports no torch, Lightning or MLflow.
"""

import argparse
import asyncio

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from cnnpipe.predict import SIZE, Classifier, decode


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused as soon as it passes `limit` bytes, whatever Content-Length claims, or
    TimeoutError if it takes over `timeout_s`: a client trickling bytes must not hold a
    connection and its buffer forever."""
    if int(request.headers.get("content-length") or 0) > limit:
        raise BodyTooLarge
    body = bytearray()
    async with asyncio.timeout(timeout_s):
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise BodyTooLarge
    return bytes(body)


async def parse_multipart(request: Request, body: bytes) -> FormData:
    async def chunks():
        yield body

    return await MultiPartParser(request.headers, chunks(), max_files=256, max_fields=256).parse()


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


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


def create_app(
    model_path: str, max_body_bytes: int = 10 << 20, top_k: int = 3, body_timeout_s: float = 10
) -> Starlette:
    classifier = Classifier.load(model_path)
    metadata = classifier.session.get_modelmeta().custom_metadata_map

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def describe(_: Request) -> JSONResponse:
        return JSONResponse(
            {
                "class_names": classifier.class_names,
                "input": f"image files; each is converted to RGB and resized to {SIZE}x{SIZE}",
                "max_body_bytes": max_body_bytes,
                "model": {k: v for k, v in metadata.items() if k != "class_names"},
            }
        )

    async def predict(request: Request) -> JSONResponse:
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
        predictions = [
            {"file": name, "top_k": [{"label": c, "probability": p} for c, p in top], "note": note}
            for (name, _), top, note in zip(
                files, classifier.top_k(probs, top_k), notes, strict=True
            )
        ]
        return JSONResponse({"predictions": predictions})

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/metadata", describe),
            Route("/predict", predict, methods=["POST"]),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cnnpipe serve", description=__doc__)
    parser.add_argument("model", help="the exported ONNX file, e.g. models/model.onnx")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes it to the network")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-body-mb", type=float, default=10)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--body-timeout-s", type=float, default=10)
    args = parser.parse_args(argv)
    max_body = int(args.max_body_mb * (1 << 20))
    app = create_app(args.model, max_body, args.top_k, args.body_timeout_s)
    uvicorn.run(app, host=args.host, port=args.port)

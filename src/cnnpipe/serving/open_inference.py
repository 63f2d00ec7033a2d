"""The Open Inference Protocol's REST routes (KServe v2), so its standard clients can call the
service: health, server and model metadata, and infer with tensors as JSON.

https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/
"""

import json
import math
from collections.abc import Iterator

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cnnpipe.artifact import contract
from cnnpipe.serving.http import RequestError, read_body


def parse_json(body: bytes) -> object:
    """The request body as JSON; ValueError for anything that is not plain JSON: invalid text,
    NaN and Infinity (Python's json takes them), nesting deeper than the parser's stack."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not a JSON number")

    try:
        return json.loads(body, parse_constant=refuse)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError too
        raise ValueError(f"the body is not JSON ({str(error).splitlines()[0][:100]})") from None


def leaves(data: list) -> Iterator[object]:
    """The values of a (nested) JSON list in row-major order, as the protocol lays them out."""
    for item in data:
        if isinstance(item, list):
            yield from leaves(item)
        else:
            yield item


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def images_from(body: object, input_name: str, size: tuple[int, int]) -> np.ndarray:
    """The one UINT8 tensor of the contract's input shape in an infer request; ValueError says
    what is wrong with it. Everything is checked in Python before numpy sees it."""
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ValueError(f'expected {{"inputs": [one tensor named "{input_name}"]}}')
    tensor = inputs[0]
    shape, data = tensor.get("shape"), tensor.get("data")
    if tensor.get("datatype") != "UINT8":
        raise ValueError(f"datatype must be UINT8, not {str(tensor.get('datatype'))[:40]}")
    want = contract.input_shape("N", size)
    if (
        not isinstance(shape, list)
        or len(shape) != len(want)
        or not all(map(is_int, shape))
        or tuple(shape[1:]) != want[1:]
        or shape[0] < 1
    ):
        raise ValueError(f"shape must be [{', '.join(map(str, want))}], not {str(shape)[:80]}")
    if not isinstance(data, list):
        raise ValueError("data must be a list of integers")
    try:
        values = list(leaves(data))
    except RecursionError:
        raise ValueError("data is nested too deeply") from None
    if len(values) != math.prod(shape):
        raise ValueError(f"data has {len(values)} values; shape {shape} needs {math.prod(shape)}")
    if not all(map(is_int, values)):
        raise ValueError("data must be a list of integers")
    if values and (min(values) < 0 or max(values) > 255):
        raise ValueError("UINT8 data must be in 0-255")
    return np.array(values, dtype=np.uint8).reshape(shape)


def served(request: Request) -> tuple[str, str]:
    """The name and version of the served model (the service's metadata); RequestError 404 if
    the request's path names another."""
    model = request.app.state.service.metadata
    name, version = model["name"] or "model", model["version"] or "1"
    asked, asked_version = request.path_params["model"], request.path_params.get("version")
    if asked != name:
        raise RequestError(404, f"no model {asked}; this server has {name}")
    if asked_version not in (None, version):
        raise RequestError(
            404, f"model {name} has no version {asked_version}; this server has version {version}"
        )
    return name, version


async def ok(_: Request) -> Response:
    return Response(status_code=200)


async def server(_: Request) -> JSONResponse:
    return JSONResponse({"name": "cnnpipe", "version": "1", "extensions": []})


async def metadata(request: Request) -> JSONResponse:
    name, version = served(request)
    model = request.app.state.service.metadata
    return JSONResponse(
        {
            "name": name,
            "versions": [version],
            "platform": "onnxruntime_onnx",
            "inputs": [{**model["input"], "datatype": "UINT8"}],
            "outputs": [{**model["output"], "datatype": "FP32"}],
        }
    )


async def ready(request: Request) -> Response:
    served(request)
    return Response(status_code=200)


async def infer(request: Request) -> JSONResponse:
    name, version = served(request)
    service = request.app.state.service
    limits = service.limits
    body = await read_body(request, limits.max_body_bytes, limits.body_timeout_s)

    def prepare() -> tuple[np.ndarray, np.ndarray]:
        # In the batcher's thread: checking a large body must not stall every other connection.
        # The images come back beside their probabilities, for capture.
        images = images_from(parse_json(body), contract.INPUT_NAME, service.model.size)
        return images, images

    try:
        probs, images = await service.batcher.run(prepare)
    except ValueError as reason:
        raise RequestError(400, str(reason)) from None
    service.images_classified.inc(len(probs))
    if service.capture:
        service.capture.offer(list(images), probs, request.url.path)
    output = {
        "name": service.metadata["output"]["name"],
        "shape": list(probs.shape),
        "datatype": "FP32",
        "data": probs.reshape(-1).tolist(),
    }
    return JSONResponse({"model_name": name, "model_version": version, "outputs": [output]})


PREFIX = "/v2/models/{model}"
VERSION = PREFIX + "/versions/{version}"
ROUTES = [
    Route("/v2", server, include_in_schema=False),
    Route("/v2/health/live", ok, include_in_schema=False),
    Route("/v2/health/ready", ok, include_in_schema=False),
    *[
        route
        for prefix in (PREFIX, VERSION)
        for route in (
            Route(prefix, metadata, include_in_schema=False),
            Route(f"{prefix}/ready", ready, include_in_schema=False),
            Route(f"{prefix}/infer", infer, methods=["POST"], include_in_schema=False),
        )
    ],
]

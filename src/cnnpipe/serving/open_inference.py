"""The Open Inference Protocol's REST routes (KServe v2), so its standard clients can call the
service: health, server and model metadata, and infer with tensors as JSON.

https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/
"""

import json

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cnnpipe import contract
from cnnpipe.serving.http import RequestError, read_body
from cnnpipe.serving.onnx_model import OnnxModel


def images_from(body: object, input_name: str) -> np.ndarray:
    """The one UINT8 tensor of the contract's input shape in an infer request; ValueError says
    what is wrong with it."""
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ValueError(f'expected {{"inputs": [one tensor named "{input_name}"]}}')
    tensor = inputs[0]
    shape, data = tensor.get("shape"), tensor.get("data")
    if tensor.get("datatype") != "UINT8":
        raise ValueError(f"datatype must be UINT8, not {tensor.get('datatype')}")
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or tuple(shape[1:]) != contract.input_shape()[1:]
        or not isinstance(shape[0], int)
        or shape[0] < 1
    ):
        raise ValueError(
            f"shape must be [{', '.join(map(str, contract.input_shape()))}], not {shape}"
        )
    try:
        values = np.asarray(data, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError("data must be a list of integers") from None
    if values.size != np.prod(shape):
        raise ValueError(f"data has {values.size} values; shape {shape} needs {np.prod(shape)}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ValueError("UINT8 data must be in 0-255")
    return values.astype(np.uint8).reshape(shape)


def routes(
    onnx_model: OnnxModel, model: dict, max_body_bytes: int, body_timeout_s: float
) -> list[Route]:
    """The v2 routes for `onnx_model`, named and described by `model` (the service's metadata)."""
    name = model["name"] or "model"
    version = model["version"] or "1"
    description = {
        "name": name,
        "versions": [version],
        "platform": "onnxruntime_onnx",
        "inputs": [{**model["input"], "datatype": "UINT8"}],
        "outputs": [{**model["output"], "datatype": "FP32"}],
    }

    async def ok(_: Request) -> Response:
        return Response(status_code=200)

    async def server(_: Request) -> JSONResponse:
        return JSONResponse({"name": "cnnpipe", "version": "1", "extensions": []})

    def check_model(request: Request) -> None:
        if request.path_params["model"] != name or (
            request.path_params.get("version") not in (None, version)
        ):
            raise RequestError(
                404, f"no model {request.path_params['model']}; this server has {name}"
            )

    async def metadata(request: Request) -> JSONResponse:
        check_model(request)
        return JSONResponse(description)

    async def ready(request: Request) -> Response:
        check_model(request)
        return Response(status_code=200)

    async def infer(request: Request) -> JSONResponse:
        check_model(request)
        body = await read_body(request, max_body_bytes, body_timeout_s)
        try:
            images = images_from(json.loads(body), contract.INPUT_NAME)
        except ValueError as reason:  # also bodies that are not JSON
            raise RequestError(400, str(reason)) from None
        probs = await run_in_threadpool(onnx_model.probabilities, images)
        output = {
            "name": model["output"]["name"],
            "shape": list(probs.shape),
            "datatype": "FP32",
            "data": probs.reshape(-1).tolist(),
        }
        return JSONResponse({"model_name": name, "model_version": version, "outputs": [output]})

    prefix = "/v2/models/{model}"
    return [
        Route("/v2", server, include_in_schema=False),
        Route("/v2/health/live", ok, include_in_schema=False),
        Route("/v2/health/ready", ok, include_in_schema=False),
        Route(prefix, metadata, include_in_schema=False),
        Route(f"{prefix}/ready", ready, include_in_schema=False),
        Route(f"{prefix}/infer", infer, methods=["POST"], include_in_schema=False),
        Route(f"{prefix}/versions/{{version}}", metadata, include_in_schema=False),
        Route(f"{prefix}/versions/{{version}}/ready", ready, include_in_schema=False),
        Route(
            f"{prefix}/versions/{{version}}/infer", infer, methods=["POST"], include_in_schema=False
        ),
    ]

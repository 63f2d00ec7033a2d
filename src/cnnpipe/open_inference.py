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

from cnnpipe.http_body import BodyTooLarge, error, read_body
from cnnpipe.predict import SIZE, Classifier


def images_from(body: object, input_name: str) -> np.ndarray:
    """The one UINT8 [N, 32, 32, 3] input tensor of an infer request; ValueError says what is
    wrong with it."""
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
        or shape[1:] != [SIZE, SIZE, 3]
        or not isinstance(shape[0], int)
        or shape[0] < 1
    ):
        raise ValueError(f"shape must be [N, {SIZE}, {SIZE}, 3], not {shape}")
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
    classifier: Classifier, model: dict, max_body_bytes: int, body_timeout_s: float
) -> list[Route]:
    """The v2 routes for `classifier`, named and described by `model` (the service's metadata)."""
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

    def known(request: Request) -> bool:
        return request.path_params["model"] == name and (
            request.path_params.get("version") in (None, version)
        )

    async def metadata(request: Request) -> JSONResponse:
        if not known(request):
            return error(404, f"no model {request.path_params['model']}; this server has {name}")
        return JSONResponse(description)

    async def ready(request: Request) -> Response:
        if not known(request):
            return error(404, f"no model {request.path_params['model']}; this server has {name}")
        return Response(status_code=200)

    async def infer(request: Request) -> JSONResponse:
        if not known(request):
            return error(404, f"no model {request.path_params['model']}; this server has {name}")
        try:
            body = json.loads(await read_body(request, max_body_bytes, body_timeout_s))
            images = images_from(body, classifier.input_name)
        except BodyTooLarge:
            return error(413, f"body over {max_body_bytes} bytes")
        except TimeoutError:
            return error(408, f"body not received within {body_timeout_s:g} s")
        except ValueError as reason:  # also bodies that are not JSON
            return error(400, str(reason))
        probs = await run_in_threadpool(classifier.probabilities, images)
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

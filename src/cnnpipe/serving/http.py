"""HTTP for every route of the service: request bodies read with a size limit and a deadline,
and every error as JSON."""

import asyncio

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse


class RequestError(Exception):
    """A request the service refuses: `status` and a message that says what to send instead."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused (413) as soon as it passes `limit` bytes, whatever Content-Length
    claims, or (408) if it takes over `timeout_s`: a client trickling bytes must not hold a
    connection and its buffer forever."""
    too_large = RequestError(413, f"body over {limit} bytes")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large
    except TimeoutError:
        raise RequestError(408, f"body not received within {timeout_s:g} s") from None
    return bytes(body)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def request_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestError)
    return error(exc.status, exc.message)


async def routing_error(_: Request, exc: Exception) -> JSONResponse:
    """Starlette's own 404 and 405, for paths and methods no route takes."""
    assert isinstance(exc, HTTPException)
    body = {"error": f"{exc.detail}; the routes are in /openapi.json"}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


EXCEPTION_HANDLERS = {RequestError: request_error, HTTPException: routing_error}

"""Request bodies read with a size limit and a deadline, and errors as JSON: for every route of
the service that takes a body."""

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse


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


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)

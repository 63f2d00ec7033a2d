"""`cnnpipe serve MODEL`: the service (app.py) on uvicorn, with a deadline for request headers.

MODEL is the ONNX file or a registered version: models:/NAME/VERSION or models:/NAME@ALIAS.
"""

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import h11
import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol

from cnnpipe import PipelineError
from cnnpipe.args import COUNT, MEGABYTES, PORT, SECONDS, Parser
from cnnpipe.serving.app import create_app


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
    parser = Parser(prog="cnnpipe serve", description=__doc__)
    parser.add_argument(
        "model", help="the exported ONNX file (models/model.onnx) or models:/NAME@ALIAS"
    )
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes it to the network")
    parser.add_argument("--port", type=PORT, default=8000)
    parser.add_argument("--max-body-mb", type=MEGABYTES, default=10)
    parser.add_argument("--top-k", type=COUNT, default=3)
    parser.add_argument("--body-timeout-s", type=SECONDS, default=10)
    parser.add_argument("--header-timeout-s", type=SECONDS, default=10)
    args = parser.parse_args(argv)
    max_body = int(args.max_body_mb * (1 << 20))
    path, registered = args.model, None
    if path.startswith("models:/"):
        # Here only: serving a file needs no MLflow.
        from cnnpipe.tracking.registry import fetch_registered

        path, registered = fetch_registered(path)
    app = create_app(path, max_body, args.top_k, args.body_timeout_s, registered)
    server(app, args.host, args.port, args.header_timeout_s).run()

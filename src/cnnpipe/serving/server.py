"""`cnnpipe serve MODEL`: the service (app.py) on uvicorn, with a deadline for request headers.

MODEL is the ONNX file or a registered version: models:/NAME/VERSION or models:/NAME@ALIAS.
"""

import asyncio
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import wait
from pathlib import Path

import h11
import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cnnpipe import PipelineError
from cnnpipe.base.args import (
    COUNT,
    MEGABYTES,
    MILLISECONDS,
    PERIOD,
    PORT,
    SECONDS,
    SHARE,
    Parser,
    number,
)
from cnnpipe.serving.app import Limits, create_app
from cnnpipe.serving.capture import Settings
from cnnpipe.serving.follow import Follower
from cnnpipe.serving.onnx_model import checked_model


class HeaderDeadline:
    """A deadline for each request's headers, mixed into uvicorn's HTTP/1.1 protocols: uvicorn
    closes a connection that stays silent, but not one that trickles its headers a byte at a
    time. The protocol class says when its parser has the headers (`headers_pending`)."""

    seconds: float
    timer: asyncio.TimerHandle | None = None
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def headers_pending(self) -> bool:
        raise NotImplementedError

    def arm(self) -> None:
        self.disarm()
        self.timer = self.loop.call_later(self.seconds, self.headers_late)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self.arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():  # the next request on this connection
            self.arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def headers_late(self) -> None:
        self.timer = None
        if self.headers_pending() and not self.transport.is_closing():
            message = f"request headers not received within {self.seconds:g} s".encode()
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(message), message)
            )
            self.transport.close()


class HttpToolsDeadline(HeaderDeadline, HttpToolsProtocol):
    """httptools (llhttp, in C): the parser the service uses."""

    headers_in = False

    def headers_pending(self) -> bool:
        return not self.headers_in

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.headers_in = False

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self.headers_in = True
        self.disarm()


class H11Deadline(HeaderDeadline, H11Protocol):
    """h11, in pure Python: uvicorn's other parser, kept as a fallback and for comparison (the
    service before httptools, in bench/)."""

    def headers_pending(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.headers_pending():
            self.disarm()


PARSERS = {"httptools": HttpToolsDeadline, "h11": H11Deadline}
# uvloop (libuv, in C): uvicorn's faster event loop; asyncio's own is kept for comparison.
LOOPS = ["uvloop", "asyncio"]


def server(
    app: Starlette,
    host: str,
    port: int,
    header_timeout_s: float,
    parser: str = "httptools",
    loop: str = "uvloop",
    access_log: bool = False,
    log_level: str = "info",
) -> uvicorn.Server:
    protocol = type("Protocol", (PARSERS[parser],), {"seconds": header_timeout_s})
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        loop=loop,
        access_log=access_log,
        log_level=log_level,
    )
    return uvicorn.Server(config)


@contextmanager
def running(
    app: Starlette,
    header_timeout_s: float = 10,
    parser: str = "httptools",
    loop: str = "uvloop",
    start_s: float = 30,
) -> Iterator[str]:
    """The app on a free 127.0.0.1 port in a thread, for tests and benchmarks: its base URL."""
    service = server(app, "127.0.0.1", 0, header_timeout_s, parser, loop, log_level="warning")
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


def worker(sock: socket.socket, app_args: tuple, options: dict) -> None:
    """One of `serve_workers`' processes: its own model and batcher, on the shared socket."""
    server(create_app(*app_args), "", 0, **options).run(sockets=[sock])


def serve_workers(workers: int, host: str, port: int, app_args: tuple, options: dict) -> None:
    """The service in `workers` processes accepting on one socket: a process runs one thread of
    Python at a time, and its HTTP and batching keep about one core busy (docs/performance.md).
    The metrics of all of them are shown together (Prometheus' multiprocess mode)."""
    checked_model(app_args[0])  # a bad model is refused here once, in one line
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as error:
        # create_server appends the address to strerror, so errno's own text is the reason;
        # negative errnos are getaddrinfo's, for a host name that does not resolve.
        errno = error.errno or 0
        reason = os.strerror(errno) if errno > 0 else "the host does not resolve"
        raise PipelineError(
            f"cannot listen on {host}:{port} ({reason}): choose another --port or --host"
        ) from None
    spawn = multiprocessing.get_context("spawn")  # onnxruntime's threads do not survive a fork
    processes = [
        spawn.Process(target=worker, args=(sock, app_args, options)) for _ in range(workers)
    ]
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True
        for process in processes:
            if process.is_alive():
                process.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with tempfile.TemporaryDirectory(prefix="cnnpipe-metrics-") as metrics:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics  # read by each worker as it starts
        for process in processes:
            process.start()
        url = f"http://{host}:{sock.getsockname()[1]}"
        print(f"serving on {url} in {workers} worker processes (Ctrl+C stops)", file=sys.stderr)
        ready = wait([process.sentinel for process in processes])
        ended = next(p for p in processes if p.sentinel in ready)
        failed = not stopping
        stop()
        for process in processes:
            process.join()
    if failed:
        code = ended.exitcode or 0
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise PipelineError(f"worker process {ended.pid} {how}, so the service stopped")


def arguments() -> Parser:
    """`cnnpipe serve`'s command line."""
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
    batching = parser.add_argument_group(
        "batching", "concurrent requests are classified together, in one model call"
    )
    batching.add_argument("--max-batch", type=COUNT, default=Limits.max_batch,
                          help="requests in one model call (1: each on its own)")  # fmt: skip
    batching.add_argument("--batch-window-ms", type=MILLISECONDS,
                          default=Limits.batch_window_s * 1000,
                          help="how long the first request waits for others")  # fmt: skip
    batching.add_argument("--max-queue", type=COUNT, default=Limits.max_queue,
                          help="requests that may wait; more are answered 503")  # fmt: skip
    parser.add_argument("--http", choices=list(PARSERS), default="httptools",
                        help="the HTTP parser; h11 is pure Python")  # fmt: skip
    parser.add_argument("--loop", choices=LOOPS, default="uvloop",
                        help="the event loop; asyncio is Python's own")  # fmt: skip
    # Off by default: a line per request takes a fifth of the service's requests/s; /metrics
    # counts requests by route and status.
    parser.add_argument("--access-log", action="store_true", help="log each request")
    parser.add_argument("--workers", type=COUNT, default=2,
                        help="processes serving the port, each with its model")  # fmt: skip
    parser.add_argument(
        "--alias-check-s", metavar="S", type=PERIOD, default=30,
        help="for models:/NAME@ALIAS, how often to check where the alias points, and serve the "
        "version it moves to (0: never; default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--drift-window", metavar="N", type=number(int, 0, 1_000_000), default=Limits.drift_window,
        help="the cnnpipe_drift_* gauges compare the last N answered images with the model's "
        "test split (0: no gauges; default %(default)s)",
    )  # fmt: skip
    add_capture_arguments(parser)
    return parser


def add_capture_arguments(parser: Parser) -> None:
    keep = parser.add_argument_group(
        "capture", "keep answered images for review and retraining (off: they are users' data)"
    )
    keep.add_argument(
        "--capture", metavar="DIR", help="keep images as received in DIR, listed in captured.jsonl"
    )
    keep.add_argument(
        "--capture-unsure-below", metavar="P", type=SHARE, default=Settings.unsure_below,
        help="keep every image whose top probability is under P (default %(default)s)",
    )  # fmt: skip
    keep.add_argument(
        "--capture-share", metavar="SHARE", type=SHARE, default=Settings.sample_share,
        help="and this share of all answered images, at random, sure or not: the sample "
        "`cnnpipe monitor` reads (default %(default)s)",
    )  # fmt: skip
    keep.add_argument(
        "--capture-mb", metavar="MB", type=MEGABYTES, default=Settings.max_mb,
        help="stop keeping when DIR holds this much (default %(default)s)",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)
    kept = args.capture and Settings(
        args.capture, args.capture_unsure_below, args.capture_share, args.capture_mb
    )
    limits = Limits(
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        top_k=args.top_k,
        body_timeout_s=args.body_timeout_s,
        max_batch=args.max_batch,
        batch_window_s=args.batch_window_ms / 1000,
        max_queue=args.max_queue,
        drift_window=args.drift_window,
    )
    path, registered = args.model, None
    if path.startswith("models:/"):
        # Here only: serving a file needs no MLflow.
        from cnnpipe.tracking.registry import fetch_registered

        path, registered = fetch_registered(path)
    options = {
        "header_timeout_s": args.header_timeout_s,
        "parser": args.http,
        "loop": args.loop,
        "access_log": args.access_log,
    }
    following = "@" in args.model and args.model.startswith("models:/") and args.alias_check_s
    with tempfile.TemporaryDirectory(prefix="cnnpipe-model-") as folder:
        pointer = Path(folder) / "model.json"
        follower = following and Follower(args.model, registered, path, pointer, args.alias_check_s)
        app_args = (path, limits, registered, kept or None, str(pointer) if following else None)
        if follower:
            follower.start()
        try:
            if args.workers > 1:
                serve_workers(args.workers, args.host, args.port, app_args, options)
            else:
                server(create_app(*app_args), args.host, args.port, **options).run()
        finally:
            if follower:
                follower.stop()

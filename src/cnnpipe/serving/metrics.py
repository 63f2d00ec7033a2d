"""Prometheus metrics of the service's HTTP traffic, as ASGI middleware."""

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send


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

"""HTTP endpoints of a node, as an ASGI app (optional extra ``eventmill[http]``:
``prometheus_client`` and, to serve it alone, ``uvicorn``).

- ``GET /metrics``: Prometheus text format (``eventmill.metrics``);
- ``GET /healthz``: liveness, 200 while the node runs and no component failed (a broker
  backing off from a database outage is alive: it recovers by itself), else 503;
- ``GET /readyz``: readiness, 200 while the node is ready, its broker's view is current
  (so the database answers), every subscriber holds at least its group's fair share of
  sources and, when a lag bound is given, no group lags beyond it; else 503 with the
  reason as text.

Mount it in an existing ASGI app (e.g. FastAPI: ``app.mount("/ops", endpoints)``) and
run ``endpoints.metrics.run()`` in its lifespan; or ``async with serving(endpoints,
port=...)``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from eventmill.cluster_status import LagBound
from eventmill.errors import MissingDependencyError
from eventmill.metrics import NodeMetrics
from eventmill.node import EventProcessingNode

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class NodeEndpoints:
    """The ASGI app of ``/metrics``, ``/healthz`` and ``/readyz`` for ``node``."""

    def __init__(
        self,
        node: EventProcessingNode,
        *,
        metrics: NodeMetrics | None = None,
        lag_bound: LagBound | None = None,
    ) -> None:
        self.node = node
        self.metrics = metrics if metrics is not None else NodeMetrics(node)
        self.lag_bound = lag_bound

    def not_ready_because(self) -> str | None:
        """Why the node is not ready, or None when it is."""
        node = self.node
        if not node.alive:
            return "node not running"
        if not node.ready:
            return "not ready: starting, or its view of the holdings is not current"
        if not self.metrics.holds_fair_share():
            return "holds less than its fair share of sources"
        bound = self.lag_bound
        if bound is not None and self.metrics.lag_exceeds(bound.events, bound.seconds):
            return "lag above the bound"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope.get("path", "")
        if path.endswith("/metrics"):
            body = generate_latest(self.metrics.registry)
            await _respond(send, 200, body, CONTENT_TYPE_LATEST)
        elif path.endswith("/healthz"):
            alive = self.node.alive
            await _respond(send, 200 if alive else 503, b"ok\n" if alive else b"not alive\n")
        elif path.endswith("/readyz"):
            reason = self.not_ready_because()
            if reason is None:
                await _respond(send, 200, b"ready\n")
            else:
                await _respond(send, 503, reason.encode() + b"\n")
        else:
            await _respond(send, 404, b"not found\n")


async def _respond(
    send: Send, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8"
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type.encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@contextlib.asynccontextmanager
async def serving(
    endpoints: NodeEndpoints, *, host: str = "127.0.0.1", port: int
) -> AsyncIterator[None]:
    """Serve ``endpoints`` with uvicorn and refresh its metrics inside the block.
    Blocks until the server listens. Raises MissingDependencyError without uvicorn,
    OSError when it cannot listen on ``host:port``."""
    try:
        import uvicorn
    except ImportError as missing:
        raise MissingDependencyError(
            "eventmill run --http-port needs uvicorn: pip install 'eventmill[http]'"
        ) from missing
    config = uvicorn.Config(
        endpoints, host=host, port=port, log_level="critical", lifespan="off", access_log=False
    )
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    serving_task = asyncio.create_task(server.serve())
    while not server.started:
        if serving_task.done():
            with contextlib.suppress(BaseException):
                serving_task.result()
            raise OSError(f"cannot serve HTTP on {host}:{port}")
        await asyncio.sleep(0.01)
    refresher = asyncio.create_task(endpoints.metrics.run())
    try:
        yield
    finally:
        refresher.cancel()
        server.should_exit = True
        await asyncio.wait([refresher, serving_task])

"""The console as an ASGI application (Starlette), to serve alone (``eventmill console``)
or mount on an existing ASGI app.

Routes:

- ``GET /``: the page (``static/index.html``; its script and style under ``/static``);
- ``GET /api/state``: the latest read as JSON (reads once if none was made yet);
- ``GET /api/events``: server-sent events: ``history`` once (lag samples and changes so
  far), then ``state`` after every read (one reading task per server for every page);
- ``POST /api/actions/{name}``: an operator action (``actions.py``). Refused with 403
  unless the console has an operator token and the request carries it as
  ``Authorization: Bearer <token>`` (compared in constant time), with a JSON body and
  no foreign ``Origin`` (so another site's page cannot send it); 400 without
  ``"confirmed": true`` in the body; 404 for an action this installation lacks.

Reads start with the first page and stop with ``ConsoleApp.close()`` (or the app's
lifespan, when served alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import timedelta
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from eventmill.backends.base import Backend
from eventmill.console.actions import ConsoleAction, available_actions
from eventmill.console.cluster import ConsoleSettings
from eventmill.console.refresher import ClusterRefresher, sse
from eventmill.errors import EventmillError

STATIC = resources.files("eventmill.console") / "static"


class ConsoleApp:
    """The console's ASGI app over ``backend`` (call it as ``app(scope, receive, send)``
    or mount it). ``token``: the operator token that enables actions (None: read-only).
    Does no I/O until the first request."""

    def __init__(
        self,
        backend: Backend,
        *,
        settings: ConsoleSettings | None = None,
        token: str | None = None,
        interval: timedelta = timedelta(seconds=1),
        title: str = "eventmill",
        actions: Mapping[str, ConsoleAction] | None = None,
    ) -> None:
        if token is not None and len(token) < 16:
            raise ValueError("an operator token must have at least 16 characters")
        self.backend = backend
        self.title = title
        self.refresher = ClusterRefresher(backend, settings or ConsoleSettings(), interval=interval)
        self._token = None if token is None else token.encode()
        self.actions = dict(available_actions() if actions is None else actions)
        static = str(STATIC)
        self._app = Starlette(
            routes=[
                Route("/", self._page),
                Route("/api/config", self._config),
                Route("/api/state", self._state),
                Route("/api/events", _Events(self.refresher)),
                Route("/api/actions/{name}", self._act, methods=["POST"]),
                Mount("/static", StaticFiles(directory=static)),
            ],
            lifespan=self._lifespan,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    async def close(self) -> None:
        """Stop reading the cluster (the backend stays open)."""
        await self.refresher.close()

    @asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        await self.close()

    def _config_data(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "actions_enabled": self._token is not None,
            "actions": {name: list(action.fields) for name, action in self.actions.items()},
            "interval_ms": round(self.refresher.interval * 1000),
        }

    async def _page(self, request: Request) -> Response:
        return FileResponse(str(STATIC / "index.html"), headers=_NO_STORE)

    async def _config(self, request: Request) -> Response:
        return JSONResponse(self._config_data(), headers=_NO_STORE)

    async def _state(self, request: Request) -> Response:
        state = self.refresher.state
        if state is None:
            state = await self.refresher.refresh()
        return JSONResponse(state, headers=_NO_STORE)

    def _authorised(self, request: Request) -> str | None:
        """Why ``request`` may not act (None: it may)."""
        if self._token is None:
            return "the console is read-only: it was started without an operator token"
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), self._token):
            return "a valid operator token is required"
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.url.netloc}"
        if origin is not None and origin != own:
            return f"requests from {origin} are refused"
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return "actions take a JSON body"
        return None

    async def _act(self, request: Request) -> Response:
        refusal = self._authorised(request)
        if refusal is not None:
            return JSONResponse({"error": refusal}, status_code=403)
        action = self.actions.get(request.path_params["name"])
        if action is None:
            return JSONResponse({"error": "no such action here"}, status_code=404)
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": "the body is not JSON"}, status_code=400)
        if not isinstance(body, dict) or body.get("confirmed") is not True:
            return JSONResponse({"error": "confirm the action first"}, status_code=400)
        missing = [name for name in action.fields if not isinstance(body.get(name), str)]
        if missing:
            return JSONResponse({"error": f"missing {', '.join(missing)}"}, status_code=400)
        arguments: dict[str, str] = {name: body[name] for name in action.fields}
        try:
            done = await action.run(self.backend, arguments)
        except EventmillError as error:
            return JSONResponse({"error": str(error).strip().splitlines()[0]}, status_code=409)
        with contextlib.suppress(EventmillError):
            await self.refresher.refresh()
        return JSONResponse({"done": done})


_NO_STORE = {"cache-control": "no-store"}


class _Events:
    """The server-sent events endpoint: streams the refresher's messages until the page
    disconnects (watched on its own task, so a closed page is let go at once)."""

    def __init__(self, refresher: ClusterRefresher) -> None:
        self.refresher = refresher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-store"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )

        async def pump() -> None:
            await _send_text(send, sse("history", self.refresher.history_message()))
            async for message in self.refresher.updates():
                await _send_text(send, sse("state", message))

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        pumping = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait([pumping, watching], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pumping, watching):
                task.cancel()
            await asyncio.wait([pumping, watching])
        failure = None if pumping.cancelled() else pumping.exception()
        if failure is not None:
            raise failure


async def _send_text(send: Send, text: str) -> None:
    await send({"type": "http.response.body", "body": text.encode(), "more_body": True})

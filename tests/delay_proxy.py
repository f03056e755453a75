"""DelayProxy: a TCP proxy on loopback that holds every byte for ``delay`` seconds
before passing it on, to make a database look slow for real (statements arrive late
at the server, so they also start, lock and commit late).

::

    async with DelayProxy("127.0.0.1", 5432) as proxy:
        dsn = proxy.dsn(TEST_DSN)        # the same DSN, through the proxy
        proxy.delay = 2.0                # from now on, every client byte waits 2 s

``proxy_in_thread(host, port)`` serves one from a thread of its own, for synchronous
tests whose clients are other processes.

Only the client-to-server direction is delayed (``delay`` may change at any time; a
chunk keeps the delay it arrived with, and order is kept). Leaving the block closes
the listener and every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit, urlunsplit


class DelayProxy:
    """Forwards loopback connections to ``host``:``port``, delaying what clients send."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self.delay = 0.0
        """Seconds each chunk sent by a client waits before it is forwarded."""
        self.port = 0
        """The port the proxy listens on (after ``__aenter__``)."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def dsn(self, dsn: str) -> str:
        """``dsn`` (a URL) pointing at the proxy instead of its host and port."""
        parts = urlsplit(dsn)
        user = f"{parts.username}@" if parts.username else ""
        return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}"))

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pipe(reader, upstream_writer, delayed=True))
                group.create_task(self._pipe(upstream_reader, writer, delayed=False))
        except (OSError, asyncio.CancelledError, ExceptionGroup):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, delayed: bool
    ) -> None:
        """Copy until end of file; a chunk read at ``t`` is written at ``t + delay``
        (read on at once, so chunks queue instead of adding their delays up)."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            while True:
                due, chunk = await queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))  # the latency itself
                if not chunk:
                    return
                writer.write(chunk)
                await writer.drain()

        forwarding = asyncio.create_task(forward())
        try:
            while True:
                chunk = await reader.read(65536)
                queue.put_nowait((time.monotonic() + (self.delay if delayed else 0.0), chunk))
                if not chunk:
                    break
            await forwarding
        finally:
            forwarding.cancel()
            with contextlib.suppress(OSError):
                writer.close()


@contextlib.contextmanager
def proxy_in_thread(host: str, port: int) -> Iterator[DelayProxy]:
    """A DelayProxy to ``host``:``port`` running on an event loop in a thread of its
    own (set ``delay`` from any thread); closed, with its connections, on leaving."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="delay-proxy", daemon=True)
    thread.start()
    proxy = DelayProxy(host, port)
    try:
        asyncio.run_coroutine_threadsafe(proxy.__aenter__(), loop).result(timeout=10)
        try:
            yield proxy
        finally:
            asyncio.run_coroutine_threadsafe(proxy.__aexit__(None, None, None), loop).result(
                timeout=10
            )
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()

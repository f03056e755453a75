"""LoopConnectionPool: the connections a PostgresBackend made by ``connect`` uses on an
event loop other than the one it connected on (the loop of a SHARED_THREAD or
DEDICATED_THREAD service, or of any thread of the user's).

Why not a second psycopg ``AsyncConnectionPool`` per loop: such a pool belongs to the
loop that opened it (its lock, task queue and worker tasks live there), so it can only
be closed on that loop while the loop runs; and when the loop shuts down first
(``asyncio.run`` and the service threads cancel every task, the pool's workers
included), its ``close()`` stops half-way and leaves its connections open until garbage
collection. This pool has no worker tasks: it opens a connection when none is idle (at
most ``max_size`` in use at once), keeps the ones given back clean, and can be closed
from any thread (closing an idle psycopg connection does no I/O on any loop). A keeper
task on its loop closes it when that loop shuts down, so an ended loop leaves no
connection behind.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus

from eventmill.errors import LifecycleError, StorageError


class LoopConnectionPool:
    """Connections for one event loop; make it on that loop. ``connection()`` only on
    that loop; ``close()`` from any thread."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[AsyncConnection[Any]]],
        *,
        max_size: int,
        timeout: float,
        on_closed: Callable[[LoopConnectionPool], None],
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._connect = connect
        self._timeout = timeout
        self._on_closed = on_closed
        self._slots = asyncio.Semaphore(max_size)
        self._lock = threading.Lock()
        self._idle: list[AsyncConnection[Any]] = []
        self._closed = False
        self._released: asyncio.Future[None] = self.loop.create_future()
        self._keeper = self.loop.create_task(self._keep(), name="eventmill-loop-pool")

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """An idle connection or a new one, given back afterwards.

        Blocks while ``max_size`` are in use and while connecting, at most ``timeout``
        (then StorageError); psycopg errors from connecting pass through; LifecycleError
        once closed.
        """
        try:
            async with asyncio.timeout(self._timeout):
                await self._slots.acquire()
                try:
                    connection = self._take_idle()
                    if connection is None:
                        connection = await self._connect()
                except BaseException:
                    self._slots.release()
                    raise
        except TimeoutError:
            raise StorageError(
                f"no PostgreSQL connection on this event loop within {self._timeout:g} s"
            ) from None
        try:
            yield connection
        finally:
            try:
                await self._give_back(connection)
            finally:
                self._slots.release()

    def _take_idle(self) -> AsyncConnection[Any] | None:
        with self._lock:
            if self._closed:
                raise LifecycleError("this PostgresBackend is closed")
            return self._idle.pop() if self._idle else None

    async def _give_back(self, connection: AsyncConnection[Any]) -> None:
        """Keep a clean connection for the next caller; close any other."""
        clean = (
            not connection.closed
            and not connection.broken
            and connection.info.transaction_status is TransactionStatus.IDLE
        )
        with self._lock:
            if clean and not self._closed:
                self._idle.append(connection)
                return
        await connection.close()

    async def close(self) -> None:
        """Close the idle connections now (those in use when given back) and end the
        keeper. Never blocks; callable from any thread; idempotent."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            await connection.close()
        try:
            self.loop.call_soon_threadsafe(self._release)
        except RuntimeError:
            return  # the loop is closed: its keeper is gone with it

    def _release(self) -> None:
        if not self._released.done():
            self._released.set_result(None)

    async def _keep(self) -> None:
        """Until closed, or cancelled because the loop shuts down: then close."""
        try:
            await self._released
        finally:
            await self.close()
            self._on_closed(self)

"""PostgresEventNotifications: wake-ups through LISTEN/NOTIFY.

After each publish commits, ``PostgresEventStorage`` notifies the channel
``<schema>_events`` with the category as payload (see event_storage.py for why not
inside the publishing transaction). One dedicated autocommit
connection per backend, opened on the first ``subscribe`` (not from the pool), listens
and wakes the watchers of that category and of the log, each on its own event loop.
If the connection fails, every watcher is woken (notifications may have been lost)
and it reconnects with a growing delay; meanwhile readers rely on polling, which a
lost notification only delays, never breaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import AsyncConnection, sql

from eventmill.backends.base import EventNotifications
from eventmill.backends.wakeups import WakeupRegistry
from eventmill.events import EventSourceIdentifier

if TYPE_CHECKING:
    from eventmill.backends.postgres.backend import PostgresBackend

logger = logging.getLogger(__name__)

RECONNECT_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)


def channel_name(schema: str) -> str:
    """The NOTIFY channel of a schema's events (cut so it fits PostgreSQL's 63 bytes)."""
    return f"{schema[:56]}_events"


async def _resolved(setting: Any) -> Any:
    """A pool setting's value (psycopg_pool accepts values, functions and coroutines)."""
    if callable(setting):
        setting = setting()
    if inspect.isawaitable(setting):
        setting = await setting
    return setting


class PostgresEventNotifications(EventNotifications):
    """LISTEN on one dedicated connection; wake-ups dispatched to each watcher's loop."""

    def __init__(self, backend: PostgresBackend) -> None:
        self._backend = backend
        self.registry = WakeupRegistry()
        self._listener: asyncio.Task[None] | None = None
        self._listening: asyncio.Event | None = None
        self._closed = False

    async def subscribe(
        self, source: EventSourceIdentifier, wake: Callable[[], None]
    ) -> Callable[[], None]:
        remove = self.registry.add(source, wake)
        if self._closed:
            return remove
        if self._listener is None or self._listener.done():
            self._listening = asyncio.Event()
            self._listener = asyncio.get_running_loop().create_task(
                self._listen(self._listening), name=f"eventmill-listen-{self._backend.schema}"
            )
        assert self._listening is not None
        # Wait for the LISTEN (or its first failure); never hang a subscriber on it.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self._listening.wait()
        return remove

    async def _connect(self) -> AsyncConnection[Any]:
        pool = self._backend.pool
        conninfo: str = await _resolved(pool.conninfo)
        kwargs: dict[str, Any] = dict(await _resolved(pool.kwargs) or {})
        kwargs["autocommit"] = True
        connection = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
        await connection.execute(
            sql.SQL("LISTEN {}").format(sql.Identifier(channel_name(self._backend.schema)))
        )
        return connection

    async def _listen(self, listening: asyncio.Event) -> None:
        failures = 0
        while not self._closed:
            try:
                connection = await self._connect()
            except psycopg.Error as error:
                logger.warning("eventmill: cannot LISTEN for new events: %s", error)
                listening.set()
                await asyncio.sleep(RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)])
                failures += 1
                continue
            try:
                if failures:
                    self.registry.wake(None)
                failures = 0
                listening.set()
                async for notification in connection.notifies():
                    self.registry.wake(notification.payload)
            except psycopg.Error as error:
                logger.warning("eventmill: LISTEN connection lost: %s", error)
                self.registry.wake(None)
                failures += 1
            finally:
                await connection.close()

    async def close(self) -> None:
        """Stop listening and close the connection. Idempotent."""
        self._closed = True
        listener, self._listener = self._listener, None
        if listener is None or listener.done():
            return
        if listener.get_loop() is not asyncio.get_running_loop():
            listener.get_loop().call_soon_threadsafe(listener.cancel)
            return
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener

"""PostgresEventNotifications: wake-ups through LISTEN/NOTIFY.

After each publish commits, ``PostgresEventStorage`` notifies the channel
``<schema>_events`` with the category as payload (see event_storage.py for why not
inside the publishing transaction). One dedicated autocommit
connection per backend, opened on the first ``subscribe`` (not from the pool), listens
and wakes the watchers of that category and of the log, each on its own event loop.
The listening task runs on the backend's home loop while that loop runs (so it outlives
the threads of SHARED_THREAD and DEDICATED_THREAD services), else on the subscriber's
loop; if that loop ends, the next ``subscribe`` starts a new listener. It waits on the
connection's socket alone (not psycopg's ``notifies()``, which also wakes its loop every
0.1 s), so an idle node's loop sleeps until a notification or its own polls are due.
If the connection fails, every watcher is woken (notifications may have been lost)
and it reconnects with a growing delay; meanwhile readers rely on polling, which a
lost notification only delays, never breaks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
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


def _resolve(future: concurrent.futures.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Listener:
    """The listening task, the loop it runs on, and futures any thread may wait on."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.task: asyncio.Task[None] | None = None
        self.listening: concurrent.futures.Future[None] = concurrent.futures.Future()
        """Resolved once LISTEN ran (or first failed), or the listener ended."""
        self.stopped: concurrent.futures.Future[None] = concurrent.futures.Future()
        """Resolved once the task ended and its connection is closed."""

    @property
    def alive(self) -> bool:
        return not self.stopped.done() and not self.loop.is_closed()


class PostgresEventNotifications(EventNotifications):
    """LISTEN on one dedicated connection; wake-ups dispatched to each watcher's loop."""

    def __init__(self, backend: PostgresBackend) -> None:
        self._backend = backend
        self.registry = WakeupRegistry()
        self._lock = threading.Lock()
        self._listener: _Listener | None = None
        self._closed = False

    async def subscribe(
        self, source: EventSourceIdentifier, wake: Callable[[], None]
    ) -> Callable[[], None]:
        remove = self.registry.add(source, wake)
        with self._lock:
            if self._closed:
                return remove
            listener = self._listener
            if listener is None or not listener.alive:
                listener = self._listener = self._start_listener()
        # Wait for the LISTEN (or its first failure); never hang a subscriber on it.
        await asyncio.wait([asyncio.wrap_future(listener.listening)], timeout=10)
        return remove

    def _start_listener(self) -> _Listener:
        """A listener on the home loop if it runs, else on this one (holding the lock)."""
        here = asyncio.get_running_loop()
        home = self._backend.home_loop
        if home is not None and home is not here and home.is_running():
            listener = _Listener(home)
            try:
                home.call_soon_threadsafe(self._begin, listener)
                return listener
            except RuntimeError:
                pass  # closed meanwhile
        listener = _Listener(here)
        self._begin(listener)
        return listener

    def _begin(self, listener: _Listener) -> None:
        """On the listener's loop: start listening, unless closed meanwhile."""
        if self._closed:
            _resolve(listener.listening)
            _resolve(listener.stopped)
            return
        task = listener.loop.create_task(
            self._listen(listener.listening), name=f"eventmill-listen-{self._backend.schema}"
        )
        listener.task = task

        def ended(_: asyncio.Task[None]) -> None:
            _resolve(listener.listening)
            _resolve(listener.stopped)

        task.add_done_callback(ended)

    async def _connect(self) -> AsyncConnection[Any]:
        connection = await self._backend.dedicated_connection()
        await connection.execute(
            sql.SQL("LISTEN {}").format(sql.Identifier(channel_name(self._backend.schema)))
        )
        return connection

    async def _listen(self, listening: concurrent.futures.Future[None]) -> None:
        failures = 0
        while not self._closed:
            try:
                connection = await self._connect()
            except psycopg.Error as error:
                logger.warning("eventmill: cannot LISTEN for new events: %s", error)
                _resolve(listening)
                await asyncio.sleep(RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)])
                failures += 1
                continue
            try:
                # Notifications psycopg read while LISTEN ran are in its own backlog,
                # which only ``notifies()`` empties: wake everyone once instead (after a
                # failure, some may also have been lost).
                self.registry.wake(None)
                failures = 0
                _resolve(listening)
                await self._receive(connection)
            except psycopg.Error as error:
                logger.warning("eventmill: LISTEN connection lost: %s", error)
                self.registry.wake(None)
                failures += 1
            finally:
                await connection.close()

    async def _receive(self, connection: AsyncConnection[Any]) -> None:
        """Wake the watchers of each notification as it arrives; blocks until the
        connection fails (raises psycopg.OperationalError) or the task is cancelled.

        Waits on the socket alone: psycopg's ``notifies()`` also wakes every 0.1 s
        (its interrupt-check interval, not configurable there), ten loop wake-ups a
        second on an otherwise idle node."""
        pgconn = connection.pgconn
        encoding = connection.info.encoding
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(connection.fileno(), readable.set)
        try:
            while True:
                while (notification := pgconn.notifies()) is not None:
                    self.registry.wake(notification.extra.decode(encoding))
                await readable.wait()
                readable.clear()
                pgconn.consume_input()
        finally:
            loop.remove_reader(connection.fileno())

    async def close(self) -> None:
        """Stop listening; blocks until the connection is closed (at most 10 s if the
        listener runs on another loop). Idempotent."""
        with self._lock:
            self._closed = True
            listener, self._listener = self._listener, None
        if listener is None or not listener.alive:
            return
        try:
            listener.loop.call_soon_threadsafe(_cancel, listener)
        except RuntimeError:
            return  # its loop is closed, and the listener with it
        await asyncio.wait([asyncio.wrap_future(listener.stopped)], timeout=10)


def _cancel(listener: _Listener) -> None:
    """On the listener's loop."""
    if listener.task is not None:
        listener.task.cancel()

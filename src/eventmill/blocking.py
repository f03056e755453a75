"""Blocking publishing and reading for code without an event loop (Flask, Django,
scripts, worker threads).

::

    store = BlockingEventStore.start(lambda: PostgresBackend.connect(dsn))  # once
    store.publish("orders", "order-1", [OrderPlaced(...)])                  # any thread
    events = store.read("orders", "order-1")
    store.close()                                                           # at exit

One daemon thread runs one event loop for the store's whole life, and the backend (its
connection pool) lives on that loop: a call hands its work to the loop and waits, so no
call pays for a new loop or connection. Calls from many threads run concurrently, up to
the pool's size. Do not call it from inside a running event loop (use ``EventStore``
there): that raises LifecycleError instead of blocking the loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from eventmill.backends.base import Backend
from eventmill.conditions import WriteCondition
from eventmill.errors import LifecycleError
from eventmill.events import StoredEvent
from eventmill.store import EventStore

T = TypeVar("T")


class BlockingEventStore:
    """An EventStore whose methods block; made by ``start``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self._loop = loop
        self._thread = thread
        self._store: EventStore | None = None

    @classmethod
    def start(cls, make_backend: Callable[[], Awaitable[Backend]]) -> Self:
        """Start the loop thread and make the backend on it (``make_backend()`` is
        awaited there). Blocks until ready; raises what ``make_backend`` raises."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="eventmill-blocking", daemon=True)
        thread.start()
        store = cls(loop, thread)
        try:
            store._store = EventStore(store._call(_awaited(make_backend)))
        except BaseException:
            store._stop_loop()
            raise
        return store

    @property
    def backend(self) -> Backend:
        return self._event_store().backend

    def publish(
        self,
        category: str,
        stream: str,
        events: Sequence[object],
        *,
        condition: WriteCondition | None = None,
    ) -> list[StoredEvent]:
        """``EventStream.publish`` (NewEvents or typed events), blocking; same errors."""
        handle = self._event_store().stream(category=category, stream=stream)
        return self._call(handle.publish(events, condition=condition))

    def read(
        self,
        category: str,
        stream: str | None = None,
        *,
        after: int | None = None,
        limit: int | None = None,
    ) -> list[StoredEvent]:
        """The events of a stream (or of a whole category when ``stream`` is None) after
        ``after``, at most ``limit``, blocking; same errors as ``read``."""
        store = self._event_store()
        handle = (
            store.category(category)
            if stream is None
            else store.stream(category=category, stream=stream)
        )
        return self._call(handle.read(after=after, limit=limit))

    def close(self) -> None:
        """Close the backend and stop the loop thread. Blocks; closing twice is fine."""
        if self._store is None:
            return
        store, self._store = self._store, None
        try:
            self._call(store.backend.close())
        finally:
            self._stop_loop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _event_store(self) -> EventStore:
        if self._store is None:
            raise LifecycleError("the BlockingEventStore is closed")
        return self._store

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()
        coroutine.close()
        raise LifecycleError("BlockingEventStore called inside an event loop: use EventStore")

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def _awaited(make: Callable[[], Awaitable[T]]) -> T:
    return await make()

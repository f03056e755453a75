"""EventSource: an ordered, resumable reader of any identifier.

::

    source = EventSource(backend, CategoryIdentifier("orders"))
    page = await source.read(after=checkpoint, limit=500)
    checkpoint = source.place(page[-1])

A place is what ``after`` means for this source: the position of an event in a
stream, its sequence number everywhere else. Reading "after a place" never skips an
event that commits later with a lower place (guarantee 2 in docs/guarantees.md), so a
reader that stores the place of the last event it handled can always resume exactly
there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing

from eventmill.backends.base import Backend
from eventmill.errors import InvalidInputError
from eventmill.events import (
    EventSourceIdentifier,
    StoredEvent,
    StreamIdentifier,
    check_identifier,
    place_in,
)
from eventmill.shared_tail import SharedTail, shared_tail
from eventmill.store import DEFAULT_PAGE_SIZE, check_page_size


class EventSource:
    """Reads one source in order, ``page_size`` events per read. Making one does no I/O.

    With ``shared_tail``, reads of a log, category or partition go through the one
    ``SharedTail`` of that source on this backend and event loop, shared with the other
    sources made so (subscribers use it): see ``eventmill.shared_tail`` for what that
    changes (polls may be answered from a read up to half a second old).
    """

    def __init__(
        self,
        backend: Backend,
        identifier: EventSourceIdentifier,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        shared_tail: bool = False,
    ) -> None:
        if not isinstance(backend, Backend):
            raise InvalidInputError(f"EventSource needs a Backend, not {backend!r:.80}")
        self.backend = backend
        self.identifier = check_identifier(identifier)
        self.page_size = check_page_size(page_size)
        self._shares_tail = shared_tail and not isinstance(self.identifier, StreamIdentifier)
        self._tail: SharedTail | None = None

    def place(self, event: StoredEvent) -> int:
        """Where ``event`` is in this source: its position (stream) or sequence number."""
        return place_in(self.identifier, event)

    async def read(self, *, after: int | None, limit: int | None = None) -> list[StoredEvent]:
        """Up to ``limit`` (default ``page_size``) events strictly after ``after``.

        Raises InvalidInputError for a bad ``after`` or ``limit``, StorageError when the
        backend fails.
        """
        if after is not None and (type(after) is not int or after < 0):
            raise InvalidInputError(f"after must be None or an int >= 0, not {after!r:.80}")
        count = self.page_size if limit is None else check_page_size(limit, "limit")
        tail = self._shared_tail()
        if tail is not None:
            return await tail.read(0 if after is None else after, count)
        return await self.backend.events.read(self.identifier, after=after, limit=count)

    def _shared_tail(self) -> SharedTail | None:
        if not self._shares_tail:
            return None
        tail = self._tail
        if tail is None or tail.loop is not asyncio.get_running_loop():
            tail = self._tail = shared_tail(self.backend.events, self.identifier)
        return tail

    async def pages(
        self, *, after: int | None, batch: int | None = None
    ) -> AsyncGenerator[list[StoredEvent]]:
        """The events after ``after``, in order, a page (``page_size``) at a time until
        one is not full, the next page read while one is handed out; with ``batch``,
        PostgreSQL hands each page read from storage out in lists of at most that many
        events, decoding each only when it is asked for (``EventStorage.pages``); pages
        read through a shared tail are decoded already and come whole. Close it early with
        ``contextlib.aclosing``: a read ahead is then awaited (or, through a shared
        tail, cancelled). Raises InvalidInputError for a bad ``after`` or ``batch``,
        StorageError."""
        if after is not None and (type(after) is not int or after < 0):
            raise InvalidInputError(f"after must be None or an int >= 0, not {after!r:.80}")
        if batch is not None:
            check_page_size(batch, "batch")
        if self._shared_tail() is None:
            pages = self.backend.events.pages(
                self.identifier, after=after, limit=self.page_size, batch=batch
            )
            async with aclosing(pages):
                async for page in pages:
                    yield page
            return
        ahead: asyncio.Task[list[StoredEvent]] | None = None
        try:
            page = await self.read(after=after)
            while True:
                if len(page) == self.page_size:
                    ahead = asyncio.create_task(self.read(after=self.place(page[-1])))
                    await asyncio.sleep(0)  # its read starts before the page is handed out
                yield page  # decoded already (the tail's window): whole, whatever ``batch``
                if ahead is None:
                    return
                page, ahead = await ahead, None
        finally:
            if ahead is not None:
                ahead.cancel()
                await asyncio.gather(ahead, return_exceptions=True)

    async def iterate(self, *, after: int | None = None) -> AsyncGenerator[StoredEvent]:
        """Every event after ``after``, through ``pages`` (the next page read while one is
        handed out), until a short page. Iterate in ``contextlib.aclosing`` to end a read
        ahead at once when stopping early. Raises InvalidInputError, StorageError."""
        async with aclosing(self.pages(after=after)) as pages:
            async for page in pages:
                for event in page:
                    yield event

    async def latest(self) -> StoredEvent | None:
        """The last readable event, or None. Raises StorageError."""
        return await self.backend.events.latest(self.identifier)

    async def watch(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake()`` (on this loop) soon after events may have been published to
        this source; return the function that stops it. Best effort: keep polling."""
        tail = self._shared_tail()
        if tail is None:
            return await self.backend.notifications.subscribe(self.identifier, wake)

        def woken() -> None:
            tail.woken()  # first, so the read this wake-up leads to looks past the tail
            wake()

        return await self.backend.notifications.subscribe(self.identifier, woken)

    def __repr__(self) -> str:
        return f"<EventSource {self.identifier}>"

"""EventSource: an ordered, resumable reader of any identifier.

::

    source = EventSource(backend, CategoryIdentifier("orders"))
    page = await source.read(after=checkpoint, limit=500)
    checkpoint = source.place(page[-1])

A place is what ``after`` means for this source: the position of an event in a
stream, its sequence number everywhere else. Reading "after a place" never skips an
event that commits later with a lower place (DESIGN 4.2), so a reader that stores the
place of the last event it handled can always resume exactly there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from eventmill.backends.base import Backend
from eventmill.errors import InvalidInputError
from eventmill.events import EventSourceIdentifier, StoredEvent, StreamIdentifier, check_identifier
from eventmill.store import DEFAULT_PAGE_SIZE, check_page_size


class EventSource:
    """Reads one source in order, ``page_size`` events per read. Making one does no I/O."""

    def __init__(
        self,
        backend: Backend,
        identifier: EventSourceIdentifier,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        if not isinstance(backend, Backend):
            raise InvalidInputError(f"EventSource needs a Backend, not {backend!r:.80}")
        self.backend = backend
        self.identifier = check_identifier(identifier)
        self.page_size = check_page_size(page_size)
        self._by_position = isinstance(identifier, StreamIdentifier)

    def place(self, event: StoredEvent) -> int:
        """Where ``event`` is in this source: its position (stream) or sequence number."""
        return event.position if self._by_position else event.sequence_number

    async def read(self, *, after: int | None, limit: int | None = None) -> list[StoredEvent]:
        """Up to ``limit`` (default ``page_size``) events strictly after ``after``.

        Raises InvalidInputError for a bad ``after`` or ``limit``, StorageError when the
        backend fails.
        """
        if after is not None and (type(after) is not int or after < 0):
            raise InvalidInputError(f"after must be None or an int >= 0, not {after!r:.80}")
        count = self.page_size if limit is None else check_page_size(limit, "limit")
        return await self.backend.events.read(self.identifier, after=after, limit=count)

    async def iterate(self, *, after: int | None = None) -> AsyncIterator[StoredEvent]:
        """Every event after ``after``, page by page, until a short page. Raises StorageError."""
        while True:
            page = await self.read(after=after)
            for event in page:
                yield event
            if len(page) < self.page_size:
                return
            after = self.place(page[-1])

    async def latest(self) -> StoredEvent | None:
        """The last readable event, or None. Raises StorageError."""
        return await self.backend.events.latest(self.identifier)

    async def watch(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake()`` (on this loop) soon after events may have been published to
        this source; return the function that stops it. Best effort: keep polling."""
        return await self.backend.notifications.subscribe(self.identifier, wake)

    def __repr__(self) -> str:
        return f"<EventSource {self.identifier}>"

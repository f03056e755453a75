"""EventStore: the entry point for writing and reading events.

::

    store = EventStore(backend)
    await store.stream(category="orders", stream="order-1").publish([NewEvent(name="placed")])
    async for event in store.category("orders").iterate(after=41):
        ...

Handles are cheap values; making one does no I/O. ``iterate`` pages through a source
(``page_size`` events per read) so large sources are never loaded whole; ``read``
collects a small source into a list. ``observe_publishes`` tells a function of every
publish made through an ``EventStore`` on a backend (``eventmill.metrics`` counts them).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from typing import TypeAlias

from eventmill.backends.base import Backend, EventStorage
from eventmill.conditions import WriteCondition, check_condition
from eventmill.errors import InvalidEventError, InvalidInputError, describe
from eventmill.event_types import encode_event
from eventmill.events import (
    CategoryIdentifier,
    EventSourceIdentifier,
    LogIdentifier,
    NewEvent,
    StoredEvent,
    StreamIdentifier,
)
from eventmill.shared_tail import note_published

DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 10_000
MAX_EVENTS_PER_PUBLISH = 10_000


PublishObserver: TypeAlias = Callable[[str, int, float, bool], None]
"""Told of a publish once it ended: its category, its number of events, its duration in
seconds and whether it raised. Runs on the publishing loop (or thread): keep it short."""

_observers: weakref.WeakKeyDictionary[EventStorage, tuple[PublishObserver, ...]] = (
    weakref.WeakKeyDictionary()
)
_observers_lock = threading.Lock()
_observing = False
"""Whether ``_observers`` may hold an observer: one global read per publish instead of
the weak dictionary's ``len`` (True until the last one is removed)."""


def observe_publishes(backend: Backend, observer: PublishObserver) -> Callable[[], None]:
    """Call ``observer`` after every publish through an ``EventStore`` on ``backend``
    (from any loop or thread), until the returned function is called. Never blocks."""
    global _observing
    storage = backend.events
    with _observers_lock:
        _observers[storage] = (*_observers.get(storage, ()), observer)
        _observing = True

    def remove() -> None:
        global _observing
        with _observers_lock:
            left = tuple(o for o in _observers.get(storage, ()) if o is not observer)
            if left:
                _observers[storage] = left
            else:
                _observers.pop(storage, None)
            _observing = bool(_observers)

    return remove


def _new_events(events: Sequence[object]) -> list[NewEvent]:
    """The events a publish was given, checked and encoded (see EventStream.publish)."""
    if type(events) is not list and (
        isinstance(events, NewEvent) or not isinstance(events, Sequence)
    ):
        raise InvalidEventError(f"publish takes a sequence of NewEvent, not {describe(events)}")
    if not events:
        raise InvalidEventError("publish needs at least one event")
    if len(events) > MAX_EVENTS_PER_PUBLISH:
        raise InvalidEventError(
            f"at most {MAX_EVENTS_PER_PUBLISH} events per publish, not {len(events)}"
        )
    return [event if isinstance(event, NewEvent) else encode_event(event) for event in events]


def check_page_size(value: object, what: str = "page_size") -> int:
    """Return ``value`` if it is an int from 1 to MAX_PAGE_SIZE; raise InvalidInputError."""
    if type(value) is not int or not 1 <= value <= MAX_PAGE_SIZE:
        raise InvalidInputError(
            f"{what} must be an int from 1 to {MAX_PAGE_SIZE}, not {describe(value)}"
        )
    return value


def _check_after(value: object) -> int | None:
    if value is None or (type(value) is int and value >= 0):
        return value
    raise InvalidInputError(f"after must be None or an int >= 0, not {describe(value)}")


class EventSourceHandle:
    """Reads one source in order. ``after`` is a sequence number for the log and
    categories and a position for streams; reading starts strictly after it."""

    def __init__(self, backend: Backend, identifier: EventSourceIdentifier) -> None:
        self._backend = backend
        self.identifier = identifier

    async def latest(self) -> StoredEvent | None:
        """The last event of the source, or None when it is empty. Raises StorageError."""
        return await self._backend.events.latest(self.identifier)

    async def iterate(
        self, *, after: int | None = None, page_size: int = DEFAULT_PAGE_SIZE
    ) -> AsyncGenerator[StoredEvent, None]:
        """Every event after ``after``, in order, read ``page_size`` at a time.

        Events published while iterating are included. Raises StorageError. A backend
        may read the next page while the events of one are handed out (PostgreSQL does):
        to stop early and end that read at once, iterate in ``contextlib.aclosing``;
        otherwise it ends when the generator is collected.
        """
        after = _check_after(after)
        check_page_size(page_size)
        pages = self._backend.events.pages(self.identifier, after=after, limit=page_size)
        async with aclosing(pages):  # ends a read ahead when the caller stops early
            async for page in pages:
                for event in page:
                    yield event

    async def read(
        self, *, after: int | None = None, limit: int | None = None
    ) -> list[StoredEvent]:
        """The events after ``after`` as a list (at most ``limit``). Raises StorageError."""
        if limit is not None and (type(limit) is not int or limit < 0):
            raise InvalidInputError(f"limit must be None or an int >= 0, not {describe(limit)}")
        events: list[StoredEvent] = []
        if limit == 0:
            return events
        after = _check_after(after)
        storage = self._backend.events
        if limit is not None and limit <= MAX_PAGE_SIZE:  # one read, nothing read ahead
            return await storage.read(self.identifier, after=after, limit=limit)
        pages = storage.pages(self.identifier, after=after, limit=MAX_PAGE_SIZE)
        async with aclosing(pages):
            async for page in pages:
                events += page
                if limit is not None and len(events) >= limit:
                    del events[limit:]
                    break
        return events

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.identifier}>"


class EventLog(EventSourceHandle):
    """Every event in the store, in sequence-number order."""


class EventCategory(EventSourceHandle):
    """Every event of one category, in sequence-number order."""

    identifier: CategoryIdentifier

    def stream(self, stream: str) -> EventStream:
        """The handle of one stream of this category."""
        return EventStream(self._backend, StreamIdentifier(self.identifier.category, stream))


class EventStream(EventSourceHandle):
    """The events of one stream, in position order; the place to publish."""

    identifier: StreamIdentifier

    async def publish(
        self, events: Sequence[object], *, condition: WriteCondition | None = None
    ) -> list[StoredEvent]:
        """Append ``events`` atomically, in order, and return them as stored.

        Each item is a NewEvent or an instance of a registered event class (see
        ``eventmill.event_types``), stored with its name, version and encoded payload.
        Raises InvalidEventError for an empty or oversized batch, any other item or one
        that cannot be encoded,
        UnmetWriteConditionError when ``condition`` does not hold, StorageError when
        the backend fails. In every failure case nothing is written.
        """
        if type(events) is list and len(events) == 1 and type(events[0]) is NewEvent:
            new_events = [events[0]]  # the usual case, without the general checks below
        else:
            new_events = _new_events(events)
        if condition is not None:
            check_condition(condition)
        storage = self._backend.events
        publish_now = storage.publish_now
        started = time.perf_counter()
        failed = True
        try:
            if publish_now is not None:  # in memory: no coroutine to make and await
                stored = publish_now(self.identifier, new_events, condition)
            else:
                stored = await storage.publish(self.identifier, new_events, condition)
            failed = False
            return stored
        finally:  # also when the outcome is unknown (a commit that failed to answer)
            note_published(storage, self.identifier.category)
            if _observing:  # the publish path of a process that observes none: one test
                for observer in _observers.get(storage, ()):
                    observer(
                        self.identifier.category,
                        len(new_events),
                        time.perf_counter() - started,
                        failed,
                    )


class EventStore:
    """The event store over one backend. Constructing it does no I/O."""

    def __init__(self, backend: Backend) -> None:
        if not isinstance(backend, Backend):
            raise InvalidInputError(f"EventStore needs a Backend, not {describe(backend)}")
        self.backend = backend

    def log(self) -> EventLog:
        return EventLog(self.backend, LogIdentifier())

    def category(self, category: str) -> EventCategory:
        return EventCategory(self.backend, CategoryIdentifier(category))

    def stream(self, *, category: str, stream: str) -> EventStream:
        return EventStream(self.backend, StreamIdentifier(category, stream))

    def source(self, identifier: EventSourceIdentifier) -> EventSourceHandle:
        """The handle for any identifier (a partition reads like a category)."""
        if isinstance(identifier, StreamIdentifier):
            return EventStream(self.backend, identifier)
        return EventSourceHandle(self.backend, identifier)

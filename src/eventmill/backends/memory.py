"""The embedded in-memory backend: for the demo, and for users' own tests.

State lives in this process only. Every method takes a ``threading.Lock`` briefly, so
services running in other threads (SHARED_THREAD, DEDICATED_THREAD) may share one
backend. Reads cost what they return: categories and streams are kept as their own
lists and found by bisection, never by scanning the log.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from bisect import bisect_right
from collections.abc import Sequence
from datetime import UTC, datetime

from eventmill.backends.base import Backend, EventStorage
from eventmill.conditions import WriteCondition
from eventmill.errors import UnmetWriteConditionError
from eventmill.events import (
    CategoryIdentifier,
    CategoryPartitionIdentifier,
    EventSourceIdentifier,
    LogIdentifier,
    NewEvent,
    StoredEvent,
    StreamIdentifier,
    new_event_id,
)


def _sequence_number(event: StoredEvent) -> int:
    return event.sequence_number


class InMemoryEventStorage(EventStorage):
    """Events in lists: the log, one list per category, one per stream."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._log: list[StoredEvent] = []
        self._categories: dict[str, list[StoredEvent]] = {}
        self._streams: dict[str, dict[str, list[StoredEvent]]] = {}

    async def publish(
        self,
        stream: StreamIdentifier,
        events: Sequence[NewEvent],
        condition: WriteCondition | None,
    ) -> list[StoredEvent]:
        with self._lock:
            streams = self._streams.get(stream.category)
            existing = streams.get(stream.stream) if streams is not None else None
            latest = len(existing) - 1 if existing else None
            if condition is not None and latest not in condition.allowed:
                raise UnmetWriteConditionError(condition, latest)
            if streams is None:
                streams = self._streams[stream.category] = {}
            if existing is None:
                existing = streams[stream.stream] = []
            category = self._categories.setdefault(stream.category, [])
            observed_at = datetime.now(UTC)
            position = len(existing)
            sequence_number = len(self._log) + 1
            stored = [
                StoredEvent(
                    id=new_event_id(),
                    name=event.name,
                    category=stream.category,
                    stream=stream.stream,
                    position=position + offset,
                    sequence_number=sequence_number + offset,
                    payload=event.payload,
                    metadata=event.metadata,
                    occurred_at=event.occurred_at,
                    observed_at=observed_at,
                )
                for offset, event in enumerate(events)
            ]
            self._log.extend(stored)
            category.extend(stored)
            existing.extend(stored)
            return stored

    async def read(
        self, source: EventSourceIdentifier, *, after: int | None, limit: int
    ) -> list[StoredEvent]:
        with self._lock:
            if isinstance(source, CategoryPartitionIdentifier):
                streams = self._streams.get(source.category, {})
                pages = [
                    _page_after_sequence_number(events, after, limit)
                    for name, events in streams.items()
                    if source.contains(name)
                ]
                return list(itertools.islice(heapq.merge(*pages, key=_sequence_number), limit))
            events = self._events_of(source)
            if isinstance(source, StreamIdentifier):
                start = 0 if after is None else max(after + 1, 0)
                return events[start : start + limit]
            if isinstance(source, LogIdentifier):
                start = 0 if after is None else max(after, 0)
                return events[start : start + limit]
            return _page_after_sequence_number(events, after, limit)

    async def latest(self, source: EventSourceIdentifier) -> StoredEvent | None:
        with self._lock:
            if isinstance(source, CategoryPartitionIdentifier):
                streams = self._streams.get(source.category, {})
                lasts = [events[-1] for name, events in streams.items() if source.contains(name)]
                return max(lasts, key=_sequence_number, default=None)
            events = self._events_of(source)
            return events[-1] if events else None

    def _events_of(
        self, source: LogIdentifier | CategoryIdentifier | StreamIdentifier
    ) -> list[StoredEvent]:
        if isinstance(source, LogIdentifier):
            return self._log
        if isinstance(source, CategoryIdentifier):
            return self._categories.get(source.category, [])
        return self._streams.get(source.category, {}).get(source.stream, [])


def _page_after_sequence_number(
    events: list[StoredEvent], after: int | None, limit: int
) -> list[StoredEvent]:
    start = 0 if after is None else bisect_right(events, after, key=_sequence_number)
    return events[start : start + limit]


class InMemoryBackend(Backend):
    """Every port kept in this process. Constructing it does no I/O."""

    def __init__(self) -> None:
        self._events = InMemoryEventStorage()

    @property
    def events(self) -> InMemoryEventStorage:
        return self._events

    async def close(self) -> None:
        """Nothing to release; the data stays readable."""

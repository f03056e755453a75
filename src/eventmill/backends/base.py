"""The ports: what the rest of eventmill needs from storage, one abstract class each,
and ``Backend``, the bundle a backend hands out.

Core modules talk only to these; ``backends/memory.py`` and ``backends/postgres/``
implement them. Every method that may block is ``async``. Implementations raise
eventmill errors only (``StorageError`` wrapping driver failures).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from eventmill.conditions import WriteCondition
from eventmill.events import EventSourceIdentifier, NewEvent, StoredEvent, StreamIdentifier


class EventStorage(ABC):
    """Appends events to streams and reads any source in order."""

    @abstractmethod
    async def publish(
        self,
        stream: StreamIdentifier,
        events: Sequence[NewEvent],
        condition: WriteCondition | None,
    ) -> list[StoredEvent]:
        """Append ``events`` (already validated, at least one) to ``stream`` atomically.

        Raises UnmetWriteConditionError, writing nothing, when ``condition`` does not hold.
        """

    @abstractmethod
    async def read(
        self, source: EventSourceIdentifier, *, after: int | None, limit: int
    ) -> list[StoredEvent]:
        """Up to ``limit`` events of ``source`` in order, strictly after ``after``.

        ``after`` is a position for a stream and a sequence number otherwise; ``None``
        reads from the start. Never returns an event while an event that sorts before it
        may still commit (no skipped events, DESIGN 4.2).
        """

    @abstractmethod
    async def latest(self, source: EventSourceIdentifier) -> StoredEvent | None:
        """The last event of ``source`` readable now, or None if there is none."""


class Backend(ABC):
    """A storage backend: the bundle of ports one deployment shares."""

    @property
    @abstractmethod
    def events(self) -> EventStorage:
        """Event storage."""

    @abstractmethod
    async def close(self) -> None:
        """Release what the backend opened (a pool handed in by the user stays open)."""

"""The ports: what the rest of eventmill needs from storage, one abstract class each,
and ``Backend``, the bundle a backend hands out.

Core modules talk only to these; ``backends/memory.py`` and ``backends/postgres/``
implement them. Every method that may block is ``async``. Implementations raise
eventmill errors only (``StorageError`` wrapping driver failures).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Self, TypeAlias

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


class Lock(ABC):
    """A named lock held by this process until released or lost.

    ``async with lock:`` releases it on exit. A lock is lost when what keeps it alive
    goes away (on PostgreSQL: its connection dies); the holder learns of it through
    ``wait_lost()`` and must then stop acting as the holder.
    """

    @property
    @abstractmethod
    def name(self) -> str:
        """The name the lock was taken under."""

    @property
    @abstractmethod
    def is_held(self) -> bool:
        """False once released or known to be lost (does not block, does no I/O)."""

    @abstractmethod
    async def release(self) -> None:
        """Give the lock up. Harmless when already released or lost; raises nothing."""

    @abstractmethod
    async def wait_lost(self) -> None:
        """Block until the lock is no longer held: lost (e.g. its connection died) or
        released. Checks periodically that it is still held; raises nothing."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.release()


class LockManager(ABC):
    """Named, non-reentrant locks shared by every process using the same storage.

    Names are group or role names (non-empty text, at most 255 characters); a name
    held by anyone, including another ``Lock`` of this same manager, is refused.
    """

    @abstractmethod
    async def try_lock(self, name: str) -> Lock | None:
        """Take the lock ``name`` if it is free, without waiting; None if it is held.

        Raises InvalidIdentifierError for a bad name, StorageError when storage fails.
        """

    @abstractmethod
    async def wait_for_lock(self, name: str, timeout: timedelta) -> Lock | None:  # noqa: ASYNC109
        """Take the lock ``name``, blocking up to ``timeout`` (any length) for it to be
        free; None when the time ran out.

        Raises InvalidIdentifierError / InvalidSettingsError for a bad name or timeout,
        StorageError when storage fails.
        """


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriberRecord:
    """A live (or recently live) subscriber: one instance of a group on one node.

    ``registered_at`` is when it (last) registered, ``last_seen`` its latest heartbeat;
    on PostgreSQL both come from the database clock.
    """

    group: str
    id: str
    node_id: str
    subscription_requests: tuple[EventSourceIdentifier, ...]
    registered_at: datetime
    last_seen: datetime


class SubscriberStateStore(ABC):
    """Who is alive: one record per (group, subscriber id), refreshed by heartbeats.

    Ages are measured with the storage's clock (the database's ``now()`` on
    PostgreSQL), so nodes with skewed clocks agree on who is alive. Every method
    raises InvalidIdentifierError for bad names or identifiers and StorageError when
    storage fails.
    """

    @abstractmethod
    async def register(
        self,
        group: str,
        id: str,
        node_id: str,
        subscription_requests: Sequence[EventSourceIdentifier],
    ) -> SubscriberRecord:
        """Create or replace the record; ``registered_at`` and ``last_seen`` become now."""

    @abstractmethod
    async def heartbeat(
        self,
        group: str,
        id: str,
        node_id: str,
        subscription_requests: Sequence[EventSourceIdentifier],
    ) -> SubscriberRecord:
        """Set ``last_seen`` to now (and the node and requests to these); re-create the
        record, registered now, when it is missing (e.g. purged while the node slept)."""

    @abstractmethod
    async def remove(self, group: str, id: str) -> None:
        """Delete the record (graceful stop). Harmless when it is missing."""

    @abstractmethod
    async def list(
        self, *, group: str | None = None, max_age: timedelta | None = None
    ) -> list[SubscriberRecord]:
        """The records (of ``group`` if given) last seen at most ``max_age`` ago (all if
        None), ordered by group, then registration time, then id."""

    @abstractmethod
    async def purge(self, max_age: timedelta) -> int:
        """Delete the records last seen more than ``max_age`` ago; return how many."""


class HoldingState(enum.Enum):
    """Where a (group, source) stands in a handover."""

    ASSIGNED = "assigned"
    """The holder should process the source."""
    REVOKING = "revoking"
    """The holder must withdraw the source, then ``Release`` it."""
    RELEASED = "released"
    """Nobody holds the source; its epoch is kept."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceHolding:
    """Who holds one source of a group, under which epoch.

    ``subscriber_id`` and ``node_id`` (the holder's own node) are None exactly when the
    state is RELEASED. Epochs of a (group, source) only grow: every assignment carries a
    greater one, and checkpoint saves from an older epoch are refused.
    """

    group: str
    source: EventSourceIdentifier
    subscriber_id: str | None
    node_id: str | None
    epoch: int
    state: HoldingState


@dataclass(frozen=True, slots=True, kw_only=True)
class Assign:
    """Give ``source`` to ``subscriber_id`` (on ``node_id``) under ``epoch``, which must
    be greater than the source's current epoch (else the whole batch fails)."""

    group: str
    source: EventSourceIdentifier
    subscriber_id: str
    node_id: str
    epoch: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Revoke:
    """Ask the holder to withdraw ``source``: ASSIGNED becomes REVOKING (else no change)."""

    group: str
    source: EventSourceIdentifier


@dataclass(frozen=True, slots=True, kw_only=True)
class Release:
    """Mark ``source`` free if ``subscriber_id`` still holds it (else no change)."""

    group: str
    source: EventSourceIdentifier
    subscriber_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Remove:
    """Forget the record of ``source`` in ``group``, epoch included: use it only for a
    source nobody will be given again, since a later Assign may restart at epoch 1."""

    group: str
    source: EventSourceIdentifier


SubscriptionChange: TypeAlias = Assign | Revoke | Release | Remove


class SubscriptionStateStore(ABC):
    """Who holds what: one ``SourceHolding`` per (group, source)."""

    @abstractmethod
    async def list(
        self, *, group: str | None = None, node_id: str | None = None
    ) -> list[SourceHolding]:
        """The holdings (of ``group``, held on ``node_id``, if given), ordered by group
        then source key. Raises StorageError when storage fails."""

    @abstractmethod
    async def apply(self, changes: Sequence[SubscriptionChange]) -> None:
        """Apply every change atomically: all of them or none.

        A (group, source) may appear at most once per call (InvalidInputError
        otherwise, as for bad names, identifiers or epochs). Raises ConflictError,
        changing nothing, when an Assign's epoch is not greater than the current one
        (e.g. another coordinator got there first); StorageError when storage fails.
        """


class Backend(ABC):
    """A storage backend: the bundle of ports one deployment shares."""

    @property
    @abstractmethod
    def events(self) -> EventStorage:
        """Event storage."""

    @abstractmethod
    async def close(self) -> None:
        """Release what the backend opened (a pool handed in by the user stays open)."""

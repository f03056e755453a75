"""The ports: what the rest of eventmill needs from storage, one abstract class each,
and ``Backend``, the bundle a backend hands out.

Core modules talk only to these; ``backends/memory.py`` and ``backends/postgres/``
implement them. Every method that may block is ``async``. Implementations raise
eventmill errors only (``StorageError`` wrapping driver failures).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Self, TypeAlias

from eventmill.conditions import WriteCondition
from eventmill.errors import (
    ConflictError,
    InvalidIdentifierError,
    InvalidInputError,
    InvalidSettingsError,
)
from eventmill.events import (
    EventSourceIdentifier,
    JsonObject,
    NewEvent,
    StoredEvent,
    StreamIdentifier,
    check_identifier,
    check_name,
    place_in,
)

if TYPE_CHECKING:  # only the PostgreSQL backend imports psycopg at run time
    from psycopg import AsyncConnection


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceLag:
    """What lies in one span of a source: ``events`` counted in it and ``newest``, the
    place (sequence number, or position in a stream) of the last of them (None when
    there are none); and ``oldest_at``, when the first event after the span's start was
    stored, counted or not (None when there is none)."""

    events: int
    newest: int | None
    oldest_at: datetime | None


@dataclass(frozen=True, slots=True)
class PublisherInFlight:
    """A publish that has not ended: log and category reads wait for the oldest."""

    transaction_id: int
    """Its transaction id's low 32 bits (as pg_locks and pg_prepared_xacts show it)."""
    pid: int | None
    """The server process running it; None when it is a prepared transaction."""
    prepared_as: str | None
    """Its gid when prepared (end it with COMMIT PREPARED or ROLLBACK PREPARED)."""
    since: datetime | None
    """When its transaction began (or was prepared)."""
    application_name: str | None = None
    """Its session's application_name (None when prepared)."""
    state: str | None = None
    """Its session's state, e.g. ``idle in transaction`` (None when prepared)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadHoldback:
    """What holds log and category readers back now (``EventStorage.read_holdback``)."""

    watermark: int
    """The read watermark: reads return events below it (a transaction id)."""
    oldest: PublisherInFlight | None
    """The oldest publish in flight, which the watermark waits for (None: none)."""
    events_beyond: int
    """Committed events that readers cannot read until it ends."""
    checked_at: datetime
    """The server's time when this was read."""

    @property
    def seconds(self) -> float:
        """How long the oldest publish has held readers back (0.0 when none)."""
        since = None if self.oldest is None else self.oldest.since
        return 0.0 if since is None else max(0.0, (self.checked_at - since).total_seconds())

    def to_json(self) -> dict[str, Any]:
        """As JSON-ready data (times as ISO 8601 text)."""
        oldest = self.oldest
        return {
            "watermark": self.watermark,
            "events_beyond": self.events_beyond,
            "seconds": round(self.seconds, 3),
            "oldest": None
            if oldest is None
            else {
                "pid": oldest.pid,
                "transaction_id": oldest.transaction_id,
                "application_name": oldest.application_name,
                "state": oldest.state,
                "prepared_as": oldest.prepared_as,
                "since": None if oldest.since is None else oldest.since.isoformat(),
            },
        }


LagPlace: TypeAlias = tuple[EventSourceIdentifier, int | None, int | None]
"""A span of a source to count: (source, after, through); places as for
``EventStorage.read``, ``after`` None from the start, ``through`` None to the end."""

_LAG_PAGE = 1000
"""Events per read when ``EventStorage.lags`` counts by reading."""


class EventStorage(ABC):
    """Appends events to streams and reads any source in order."""

    publish_now: (
        Callable[[StreamIdentifier, Sequence[NewEvent], WriteCondition | None], list[StoredEvent]]
        | None
    ) = None
    """``publish`` as a plain call, on storage whose publish never waits (in memory);
    ``EventStream.publish`` then calls it and spends no coroutine on ``publish``, so
    storage that sets it must make ``publish`` do exactly what it does. None elsewhere."""

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
        may still commit (no skipped events).
        """

    async def pages(
        self,
        source: EventSourceIdentifier,
        *,
        after: int | None,
        limit: int,
        batch: int | None = None,
    ) -> AsyncGenerator[list[StoredEvent], None]:
        """Every event of ``source`` after ``after``, in order, as pages of ``limit``
        read one after the other, ending with the first shorter page (maybe empty).
        Each page is what ``read`` returns from the end of the one before. A backend may
        read the next page while this one is handed out (PostgreSQL does). ``batch`` is
        for a backend that turns rows into events (PostgreSQL): it hands a page out in
        lists of at most ``batch`` events, each decoded only when it is asked for, so a
        caller that works between lists spreads a page's decoding over its work. Events
        already in memory have nothing to spread: they come a whole page at a time,
        as here (lists cost a caller per-list work for nothing: a node's in-memory drain
        ran 25 % slower in lists of 100). Raises StorageError."""
        while True:
            page = await self.read(source, after=after, limit=limit)
            yield page
            if len(page) < limit:
                return
            after = place_in(source, page[-1])

    @abstractmethod
    async def latest(self, source: EventSourceIdentifier) -> StoredEvent | None:
        """The last event of ``source`` readable now, or None if there is none."""

    async def lags(self, places: Sequence[LagPlace]) -> list[SourceLag]:
        """For each (source, after, through) of ``places``, in order, what lies in that
        span of the source (``SourceLag``). This reads the events; a backend may count
        them without reading (PostgreSQL does, for all places in one statement), so a
        reader's lag costs what the span holds: count it once, then only what arrived
        and what was processed since. Raises StorageError."""
        lags = []
        for source, after, through in places:
            count, newest, oldest_at, place = 0, None, None, after
            while page := await self.read(source, after=place, limit=_LAG_PAGE):
                oldest_at = oldest_at or page[0].observed_at
                read = [place_in(source, event) for event in page]
                counted = [place for place in read if through is None or place <= through]
                count += len(counted)
                newest = counted[-1] if counted else newest
                if len(counted) < len(read):
                    break
                place = read[-1]
            lags.append(SourceLag(events=count, newest=newest, oldest_at=oldest_at))
        return lags

    async def read_holdback(self) -> ReadHoldback | None:
        """The read watermark, the oldest publish in flight and the committed events
        readers wait for behind it; None where reads never wait for a publish (in
        memory). Raises StorageError."""
        return None


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

    async def confirm(self) -> bool:
        """Check now that the lock is still held (PostgreSQL: one round trip on its
        connection), e.g. before acting on it after a pause; False once lost or
        released. Raises nothing."""
        return self.is_held

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.release()


@dataclass(frozen=True, slots=True, kw_only=True)
class LockHolder:
    """Who holds a lock, as far as the storage can tell: ``session`` (PostgreSQL: the
    holding connection's server process id) and that connection's ``application_name``;
    None when the storage does not know."""

    session: int | None
    application_name: str | None


class LockManager(ABC):
    """Named, non-reentrant locks shared by every process using the same storage.

    Names are group or role names (non-empty text, at most 255 characters); a name
    held by anyone, including another ``Lock`` of this same manager, is refused.
    """

    @abstractmethod
    async def try_lock(self, name: str, *, lease: timedelta | None = None) -> Lock | None:
        """Take the lock ``name`` if it is free, without waiting; None if it is held.

        ``lease``: when the holding process stops responding (frozen) for about this
        long, the storage may drop the lock so that another process can take it (on
        PostgreSQL: the server ends the lock's idle session); None: held as long as
        what keeps it alive lives. Raises InvalidIdentifierError for a bad name,
        InvalidSettingsError for a bad lease, StorageError when storage fails.
        """

    @abstractmethod
    async def wait_for_lock(
        self,
        name: str,
        timeout: timedelta,  # noqa: ASYNC109
        *,
        lease: timedelta | None = None,
    ) -> Lock | None:
        """Take the lock ``name``, blocking up to ``timeout`` (any length) for it to be
        free; None when the time ran out. ``lease``: as for ``try_lock``.

        Raises InvalidIdentifierError / InvalidSettingsError for a bad name, timeout or
        lease, StorageError when storage fails.
        """

    @abstractmethod
    async def holder(self, name: str) -> LockHolder | None:
        """Who holds the lock ``name`` now (anyone, in any process), or None if it is
        free. Raises InvalidIdentifierError for a bad name, StorageError when storage
        fails."""


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
    PostgreSQL), so nodes with skewed clocks agree on who is alive. A record is *live
    for* ``max_age`` when it was last seen at most ``max_age`` before the freshest
    record (or before now, if that is earlier), and at most twice ``max_age`` ago: when
    the storage is slow, every node's heartbeats arrive late alike and nobody is taken
    for dead; a node whose heartbeats stop falls behind the others' and is. Every
    method raises InvalidIdentifierError for bad names or identifiers and StorageError
    when storage fails.
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

    async def heartbeat_all(
        self,
        node_id: str,
        subscribers: Sequence[tuple[str, str, Sequence[EventSourceIdentifier]]],
    ) -> None:
        """``heartbeat`` each (group, id, subscription_requests) of ``node_id``; a
        backend may do it in one round trip (PostgreSQL does: one statement)."""
        for group, id, requests in subscribers:
            await self.heartbeat(group, id, node_id, requests)

    @abstractmethod
    async def remove(self, group: str, id: str) -> None:
        """Delete the record (graceful stop). Harmless when it is missing."""

    @abstractmethod
    async def list(
        self, *, group: str | None = None, max_age: timedelta | None = None
    ) -> list[SubscriberRecord]:
        """The records (of ``group`` if given) live for ``max_age`` (all if None),
        ordered by group, then registration time, then id. Records of one group
        with equal requests share one tuple, so comparing them is cheap."""

    @abstractmethod
    async def purge(self, max_age: timedelta) -> int:
        """Delete the records not live for ``max_age``; return how many."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeRecord:
    """A node that heartbeats (any mode, coordinator-only ones included): its
    ``mode`` (``coordinator``, ``observer`` or ``both``), when it started and was last
    seen (the storage's clock) and, while it leads, ``leader_term`` (the how-manieth
    time this node became the leader) and ``leader_since``."""

    node_id: str
    mode: str
    started_at: datetime
    last_seen: datetime
    leader_term: int | None
    leader_since: datetime | None


class NodeStateStore(ABC):
    """One record per node, refreshed by its subscriber manager's heartbeat; read by
    ``eventmill status``. Raises InvalidIdentifierError for a bad node id and
    StorageError when storage fails."""

    @abstractmethod
    async def heartbeat(self, node_id: str, mode: str, *, leader_term: int | None) -> None:
        """Create or refresh the record: ``last_seen`` now; ``leader_since`` now when
        ``leader_term`` changes from None or another term, None when it is None."""

    @abstractmethod
    async def remove(self, node_id: str) -> None:
        """Delete the record (graceful stop). Harmless when missing."""

    @abstractmethod
    async def list(self) -> list[NodeRecord]:
        """Every record, ordered by node id."""

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
    be greater than the source's current epoch (else the whole batch fails).

    ``holder_dead_after`` marks a takeover from a holder judged dead (no heartbeat
    within that age): the storage checks, atomically with the write, that the current
    holder is still dead, and revokes the source from it instead if it is not.
    """

    group: str
    source: EventSourceIdentifier
    subscriber_id: str
    node_id: str
    epoch: int
    holder_dead_after: timedelta | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Revoke:
    """Ask the holder to withdraw ``source``: ASSIGNED becomes REVOKING (else no change)."""

    group: str
    source: EventSourceIdentifier


@dataclass(frozen=True, slots=True, kw_only=True)
class Release:
    """Mark ``source`` free if ``subscriber_id`` still holds it, under ``epoch`` when one
    is given (else no change): a late release never frees a newer assignment.
    ``holder_dead_after``: as for Assign (a release on behalf of a dead holder)."""

    group: str
    source: EventSourceIdentifier
    subscriber_id: str
    epoch: int | None = None
    holder_dead_after: timedelta | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Remove:
    """Forget the record of ``source`` in ``group``, epoch included: use it only for a
    source nobody will be given again, since a later Assign may restart at epoch 1."""

    group: str
    source: EventSourceIdentifier


SubscriptionChange: TypeAlias = Assign | Revoke | Release | Remove


def check_age(value: object, what: str) -> timedelta:
    """Return ``value`` if it is a non-negative timedelta; raise InvalidSettingsError."""
    if not isinstance(value, timedelta):
        raise InvalidSettingsError(f"{what} must be a timedelta, not {type(value).__name__}")
    if value < timedelta(0):
        raise InvalidSettingsError(f"{what} must not be negative: {value}")
    return value


def check_requests(
    subscription_requests: Sequence[EventSourceIdentifier],
) -> tuple[EventSourceIdentifier, ...]:
    """The requests as a tuple; raise InvalidIdentifierError if one is no identifier."""
    if isinstance(subscription_requests, str | bytes) or not isinstance(
        subscription_requests, Sequence
    ):
        raise InvalidIdentifierError(
            f"subscription requests must be a sequence: {subscription_requests!r:.80}"
        )
    return tuple(check_identifier(source) for source in subscription_requests)


def check_changes(changes: Sequence[SubscriptionChange]) -> list[SubscriptionChange]:
    """The changes as a list; raise InvalidInputError for anything but changes with valid
    names, identifiers and epochs, or when a (group, source) appears twice."""
    seen: set[tuple[str, EventSourceIdentifier]] = set()
    for change in changes:
        if not isinstance(change, Assign | Revoke | Release | Remove):
            raise InvalidInputError(f"not a subscription change: {change!r:.80}")
        check_name(change.group, "group")
        check_identifier(change.source)
        if isinstance(change, Assign | Release):
            check_name(change.subscriber_id, "subscriber id")
            epoch = change.epoch
            if (isinstance(change, Assign) or epoch is not None) and (
                type(epoch) is not int or epoch < 1
            ):
                raise InvalidInputError(f"an epoch must be an int >= 1, not {epoch!r}")
            age = change.holder_dead_after
            if age is not None and (not isinstance(age, timedelta) or age < timedelta(0)):
                raise InvalidInputError(
                    f"holder_dead_after must be None or a timedelta >= 0, not {age!r}"
                )
        if isinstance(change, Assign):
            check_name(change.node_id, "node id")
        if (change.group, change.source) in seen:
            raise InvalidInputError(
                f"{change.source} of group {change.group!r} changed twice in one batch"
            )
        seen.add((change.group, change.source))
    return list(changes)


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

        A takeover (an Assign or Release with ``holder_dead_after``) first checks the
        source's current holder: if it has a record on the holding's node last seen
        within that age (it heartbeated after the coordinator judged it dead), the
        change becomes a ``Revoke`` of the source from it (the rest of the batch still
        applies). Not failing the batch matters: the coordinator fenced the source's
        checkpoint at the new epoch, so the revived holder can no longer save it and
        must hand it over. Heartbeats of that holder that run at the same time take
        effect after this call (PostgreSQL: its record is locked, or created dead and
        locked, until commit), so the holder's next observer round sees the outcome.
        """


class EventNotifications(ABC):
    """Early wake-ups for readers: "events that may belong to this source were published".

    Best effort: a wake-up may be lost (a dropped connection) or spurious, so readers
    keep polling and use wake-ups only to poll sooner. Matching is by category: a log
    watcher is woken by every publish, a category, partition or stream watcher by a
    publish to its category.
    """

    @abstractmethod
    async def subscribe(
        self, source: EventSourceIdentifier, wake: Callable[[], None]
    ) -> Callable[[], None]:
        """Call ``wake()`` on the caller's event loop after each publish that may concern
        ``source``; return a function that stops it (calling it twice is harmless).

        Blocks until the wake-ups are set up (PostgreSQL: the LISTEN is in place). If they
        cannot be, it still returns and only polling works; it never raises StorageError.
        """


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """A consumer group's saved place in one source.

    ``after`` is the last processed sequence number (log, category, partition) or
    position (stream), ``None`` before the first event. ``version`` grows with every
    change (optimistic concurrency); ``epoch`` only grows (fencing of stale holders).
    ``reset_pending``: set by ``GroupStorage.reset``, cleared by the next save; a
    transactional processor's ``on_reset`` hook runs in that save's transaction.
    """

    group: str
    source: EventSourceIdentifier
    after: int | None
    version: int
    epoch: int
    updated_at: datetime
    reset_pending: bool = False


class ConsumerTransaction(ABC):
    """A unit of work in which a processor's own writes and a checkpoint commit together.

    ``connection`` is the backend's handle on the open transaction: on PostgreSQL a
    ``psycopg.AsyncConnection`` inside a transaction (do not commit, roll back or close
    it; eventmill commits it after the checkpoint is saved); ``None`` in memory, where
    writes apply at once and exactly-once is not offered.
    """

    @property
    @abstractmethod
    def connection(self) -> AsyncConnection[Any] | None:
        """The open transaction's connection (PostgreSQL; None in memory)."""

    @abstractmethod
    async def save_checkpoint(
        self,
        group: str,
        source: EventSourceIdentifier,
        after: int | None,
        *,
        expected_version: int | None,
        epoch: int | None = None,
    ) -> Checkpoint:
        """``CheckpointStorage.save`` inside this transaction; same errors."""


class CheckpointStorage(ABC):
    """Checkpoints per (group, source), kept apart from the events."""

    @abstractmethod
    async def get(self, group: str, source: EventSourceIdentifier) -> Checkpoint | None:
        """The checkpoint, or None if there is none. Raises StorageError."""

    @abstractmethod
    async def save(
        self,
        group: str,
        source: EventSourceIdentifier,
        after: int | None,
        *,
        expected_version: int | None,
        epoch: int | None = None,
    ) -> Checkpoint:
        """Store ``after`` if the stored version is ``expected_version`` (None: no record).

        Raises StaleEpochError, changing nothing, when ``epoch`` is given and the stored
        epoch is greater; ConflictError when the version differs. A greater ``epoch``
        is stored. Returns the new checkpoint (version + 1).
        """

    @abstractmethod
    async def fence(self, group: str, source: EventSourceIdentifier, epoch: int) -> None:
        """Raise the stored epoch to ``epoch`` (creating the record with ``after=None``),
        so saves with a lower epoch are refused from now on. Never lowers it; keeps
        ``after`` and the version of an existing record. Raises ConflictError, having
        changed nothing, when the record stays locked by another transaction (e.g. of
        a frozen holder) longer than the storage's lock timeout (PostgreSQL: 0.5 s)."""

    async def fence_all(
        self, fences: Sequence[tuple[str, EventSourceIdentifier, int]]
    ) -> list[tuple[str, EventSourceIdentifier, int]]:
        """``fence`` each (group, source, epoch); return those that stayed locked
        (ConflictError), which were not fenced. A backend may fence many per round trip
        (PostgreSQL does)."""
        locked = []
        for group, source, epoch in fences:
            try:
                await self.fence(group, source, epoch)
            except ConflictError:
                locked.append((group, source, epoch))
        return locked

    @abstractmethod
    async def reset(self, group: str, source: EventSourceIdentifier) -> None:
        """Forget the place: the next reader starts from the beginning (version + 1)."""

    @abstractmethod
    async def list(self, group: str | None = None) -> list[Checkpoint]:
        """Every checkpoint (of ``group``), by group then source key."""

    @abstractmethod
    async def places(self, group: str | None = None) -> dict[tuple[str, str], int | None]:
        """(group, source key) -> ``after`` of every checkpoint (of ``group``): what a
        cluster read needs, without building whole records. Raises StorageError."""

    @abstractmethod
    def transaction(
        self, *, bound: timedelta | None = None
    ) -> AbstractAsyncContextManager[ConsumerTransaction]:
        """Open a transaction: committed when the block exits normally, rolled back
        (changing nothing) when it raises. With ``bound``, a storage server ends the
        transaction when it sits idle, or one statement runs, longer than that (its
        session is closed; the holder's next statement raises StorageError), so a
        frozen or cut-off holder cannot keep its rows locked. Raises StorageError."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Projection:
    """One saved projection state: ``name`` is the projection, ``id`` the instance."""

    name: str
    id: str
    state: JsonObject
    version: int
    updated_at: datetime


ProjectionFilterValue: TypeAlias = str | int | float | bool | None


class ProjectionStorage(ABC):
    """Projection states, by (name, id), with simple queries.

    Each method takes an optional ``transaction`` (from ``CheckpointStorage.transaction``)
    so that on PostgreSQL a projection and its consumer's checkpoint commit together.
    """

    @abstractmethod
    async def get(
        self, name: str, id: str, *, transaction: ConsumerTransaction | None = None
    ) -> Projection | None:
        """The state saved under (name, id), or None. Raises StorageError."""

    @abstractmethod
    async def save(
        self,
        name: str,
        id: str,
        state: JsonObject,
        *,
        transaction: ConsumerTransaction | None = None,
    ) -> Projection:
        """Insert or replace the state (version + 1). Raises StorageError."""

    @abstractmethod
    async def delete(
        self, name: str, id: str, *, transaction: ConsumerTransaction | None = None
    ) -> bool:
        """Remove the state; True if there was one. Raises StorageError."""

    @abstractmethod
    async def find(
        self,
        name: str,
        *,
        where: Mapping[str, ProjectionFilterValue] | None = None,
        order_by: str | None = None,
        descending: bool = False,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Projection]:
        """States of ``name`` whose top-level keys equal the ``where`` values, sorted by
        the top-level key ``order_by`` (missing values last; ties and no key: by id),
        then paged. Raises StorageError."""


class ParkedRequest(enum.Enum):
    """What an operator asked the holder of a parked stream to do."""

    RETRY = "retry"
    """Replay the held events in order through the processor."""
    SKIP = "skip"
    """Skip the held events up to ``skip_through`` (all when None), replay the rest."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ParkedStream:
    """A stream that a group holds back in one source after its processor failed.

    The first held event is the one that failed (``sequence_number``, ``position``,
    ``event_name``); every later event of the stream that the source's consumer met is
    held too (``held`` counts them, the first included; ``last_held`` is the place in
    the source of the latest one, so a replayed pass never counts one twice). The
    source's checkpoint moves past held events; the events themselves stay in the store
    and are replayed from there. ``request`` is an operator's pending request.

    A record with ``held`` 0 holds nothing (``retrying``): its event failed ``attempts``
    times and waits for another try (the source waits at it); it is kept so that a
    new holder of the source goes on counting the tries instead of starting again.
    """

    group: str
    source: EventSourceIdentifier
    stream: StreamIdentifier
    sequence_number: int
    position: int
    event_name: str
    held: int
    last_held: int
    error_type: str
    error_message: str
    traceback: str
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    request: ParkedRequest | None = None
    skip_through: int | None = None

    @property
    def retrying(self) -> bool:
        """Whether nothing is held yet: the event waits for another try."""
        return self.held == 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SkippedEvent:
    """An event a group did not process: skipped by its failure policy (``reason``
    "policy") or by an operator ("operator"); ``error_type``/``error_message`` are the
    last failure's (empty for an operator's skip of an event that never ran)."""

    group: str
    source: EventSourceIdentifier
    stream: StreamIdentifier
    sequence_number: int
    position: int
    event_name: str
    reason: str
    error_type: str
    error_message: str
    skipped_at: datetime


class ParkedStreamStorage(ABC):
    """Parked streams per (group, source, stream), and the record of skipped events.

    Writes take an optional ``transaction`` (from ``CheckpointStorage.transaction``)
    so that on PostgreSQL they commit together with a checkpoint and a processor's own
    writes (exactly-once). The holder's writes (all but ``request``) take its ``epoch``
    and are fenced like its checkpoint saves: when the checkpoint of (group, source)
    has a newer epoch (the source moved on; the writer is a zombie), the write raises
    StaleEpochError and changes nothing. Every method raises StorageError when storage
    fails.
    """

    @abstractmethod
    async def park(
        self,
        record: ParkedStream,
        *,
        transaction: ConsumerTransaction | None = None,
        epoch: int | None = None,
    ) -> None:
        """Insert the record, or replace the one of its (group, source, stream) but
        for its ``request`` and ``skip_through``, which only ``request`` and
        ``clear_request`` change (so an operator's request is never overwritten)."""

    @abstractmethod
    async def hold(
        self,
        group: str,
        source: EventSourceIdentifier,
        stream: StreamIdentifier,
        places: Sequence[int],
        *,
        transaction: ConsumerTransaction | None = None,
        epoch: int | None = None,
    ) -> int | None:
        """Count as held the events at ``places`` (in the source) that are after
        ``last_held`` (so a replayed pass never counts one twice) and move ``last_held``
        to the greatest; return the record's ``held`` now, None when not parked."""

    @abstractmethod
    async def remove(
        self,
        group: str,
        source: EventSourceIdentifier,
        stream: StreamIdentifier,
        *,
        transaction: ConsumerTransaction | None = None,
        epoch: int | None = None,
    ) -> bool:
        """Delete the record (the stream flows again); True if there was one."""

    @abstractmethod
    async def request(
        self,
        group: str,
        stream: StreamIdentifier,
        request: ParkedRequest,
        *,
        skip_through: int | None = None,
    ) -> int:
        """Set ``request`` (and ``skip_through``) on every record of ``stream`` in
        ``group`` (whichever source parked it); return how many records there were."""

    @abstractmethod
    async def clear_request(
        self,
        group: str,
        source: EventSourceIdentifier,
        stream: StreamIdentifier,
        request: ParkedRequest,
        *,
        epoch: int | None = None,
    ) -> bool:
        """Clear the record's request if it is still ``request`` (the one the holder
        carried out); return whether it was cleared."""

    @abstractmethod
    async def record_skipped(
        self,
        event: SkippedEvent,
        *,
        transaction: ConsumerTransaction | None = None,
        epoch: int | None = None,
    ) -> None:
        """Keep ``event`` in the record of skipped events."""

    @abstractmethod
    async def skipped(self, *, group: str | None = None) -> list[SkippedEvent]:
        """The skipped events (of ``group``), ordered by group, then when skipped."""

    @abstractmethod
    async def list(
        self, *, group: str | None = None, source: EventSourceIdentifier | None = None
    ) -> list[ParkedStream]:
        """The records (of ``group``, of ``source``, if given), ordered by group, source
        key, then stream (category, stream)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupSummary:
    """What storage keeps of one subscriber group: its subscriber records (``live``:
    those last seen within the max age asked for), holdings and checkpoints."""

    group: str
    subscribers: int
    live: int
    holdings: int
    checkpoints: int


class GroupStorage(ABC):
    """Whole subscriber groups: list, retire (delete) and reset them. Every method
    raises InvalidIdentifierError for a bad group name, StorageError when storage fails."""

    @abstractmethod
    async def overview(self, *, max_age: timedelta) -> list[GroupSummary]:
        """Every group with a subscriber record, a holding or a checkpoint, by name."""

    @abstractmethod
    async def retire(self, group: str, *, max_age: timedelta) -> GroupSummary:
        """Delete every subscriber record, holding, checkpoint and parked stream of
        ``group`` at once (its record of skipped events stays, as history); return what
        was deleted (all zero for an unknown group). Raises
        GroupInUseError, deleting nothing, when one of its records was seen within
        ``max_age`` (a node still registers it)."""

    @abstractmethod
    async def reset(
        self,
        group: str,
        *,
        after: int | None,
        sources: Sequence[EventSourceIdentifier] | None = None,
    ) -> list[Checkpoint]:
        """Move the checkpoints of ``group`` (of ``sources`` only, if given; else of every
        source it holds or has a checkpoint of) so that processing resumes after the
        sequence number ``after`` (None: from the start; a stream source resumes after
        its last event numbered at most ``after``). Returns the new checkpoints.

        One atomic step per call: each source gets a new epoch (one above its holding's
        and checkpoint's), written to its checkpoint (so its current holder can save no
        more, StaleEpochError) and to its holding, which becomes REVOKING when held
        (the holder withdraws and releases it; the coordinator assigns it again at a
        newer epoch). The checkpoints are marked ``reset_pending``. The group's parked
        streams in those sources whose first held event comes after the new place are
        deleted (the replay reaches that event again and the failure policy decides
        afresh); the others stay parked (their events before the new place stay held).
        """

    @abstractmethod
    async def sequence_before(self, time: datetime) -> int | None:
        """The place to reset to so that exactly the events observed at or after
        ``time`` are processed again: one less than the first such event's sequence
        number, or the latest sequence number when there is none (None: no events)."""


class VersionState(enum.Enum):
    """Where one version of a versioned projection stands (blue/green rebuilds)."""

    BUILDING = "building"
    """Being built in its own tables; readers do not see it."""
    SERVING = "serving"
    """What the projection's read alias shows."""
    RETIRING = "retiring"
    """Replaced by a newer version; dropped once ``retire_after`` has passed."""
    RETIRED = "retired"
    """Its tables are dropped (or it was declared after a newer version served)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProjectionVersion:
    """One version of a versioned projection. ``changed_at``: when it entered its
    state; ``behind`` and ``eta_seconds``: the build's progress as last reported."""

    name: str
    version: int
    state: VersionState
    declared_at: datetime
    changed_at: datetime
    retire_after: datetime | None = None
    behind: int | None = None
    eta_seconds: float | None = None


class ProjectionVersionStorage(ABC):
    """The versions of versioned projections and their read alias. On PostgreSQL each
    version has a schema of its own for its tables, and the alias is a schema of views
    (see ``backends/postgres/projection_versions.py``). Every method raises
    StorageError when storage fails."""

    @abstractmethod
    async def declare(self, name: str, version: int) -> ProjectionVersion:
        """The record of ``version``, created BUILDING (with its empty namespace) when
        new, unless a newer version already serves: then a RETIRED record is returned
        and nothing stored (an old node must not build an old version)."""

    @abstractmethod
    async def versions(self, name: str | None = None) -> list[ProjectionVersion]:
        """Every recorded version (of ``name``), by name then version."""

    @abstractmethod
    async def report(
        self, name: str, version: int, *, behind: int, eta_seconds: float | None
    ) -> None:
        """Record a BUILDING version's progress (shown by ``eventmill status``)."""

    @abstractmethod
    async def cut_over(self, name: str, version: int, *, grace: timedelta) -> bool:
        """Atomically make the BUILDING ``version`` serve (the alias shows it from the
        commit on) and the version serving until now RETIRING, to be dropped after
        ``grace``. False, changing nothing, when ``version`` is not BUILDING or a newer
        version serves or retires already."""

    @abstractmethod
    async def retire(self, name: str, version: int, *, now: bool = False) -> bool:
        """Drop the tables of the RETIRING ``version`` once its ``retire_after`` has
        passed (at once with ``now``, also for a BUILDING version) and mark it RETIRED;
        False, changing nothing, when it is not due or is not in such a state."""


class Backend(ABC):
    """A storage backend: the bundle of ports one deployment shares."""

    @property
    @abstractmethod
    def events(self) -> EventStorage:
        """Event storage."""

    @property
    @abstractmethod
    def notifications(self) -> EventNotifications:
        """Early wake-ups for readers of new events."""

    @property
    @abstractmethod
    def checkpoints(self) -> CheckpointStorage:
        """Consumers' checkpoints."""

    @property
    @abstractmethod
    def projections(self) -> ProjectionStorage:
        """Projection states."""

    @property
    @abstractmethod
    def locks(self) -> LockManager:
        """Named locks (leader election)."""

    @property
    @abstractmethod
    def subscribers(self) -> SubscriberStateStore:
        """Who is alive: subscriber records and their heartbeats."""

    @property
    @abstractmethod
    def subscriptions(self) -> SubscriptionStateStore:
        """Who holds which source of each group, under which epoch."""

    @property
    @abstractmethod
    def parked(self) -> ParkedStreamStorage:
        """Streams held back after a processor failed, and skipped events."""

    @property
    @abstractmethod
    def nodes(self) -> NodeStateStore:
        """Which nodes are alive, in which mode, and which leads."""

    async def schema_version(self) -> int | None:
        """The newest schema migration applied (None: a backend without a schema)."""
        return None

    async def check_schema(self) -> None:  # noqa: B027 (storage without a schema)
        """Raise SchemaError when the storage is not at this code's schema version (a
        backend without a schema has nothing to check)."""

    @property
    @abstractmethod
    def groups(self) -> GroupStorage:
        """Whole groups: list, retire, reset."""

    @property
    @abstractmethod
    def projection_versions(self) -> ProjectionVersionStorage:
        """Versions of versioned projections (blue/green) and their read alias."""

    @abstractmethod
    async def close(self) -> None:
        """Release what the backend opened (a pool handed in by the user stays open)."""

"""The embedded in-memory backend: for the demo, and for users' own tests.

State lives in this process only. Every method takes a ``threading.Lock`` briefly, so
services running in other threads (SHARED_THREAD, DEDICATED_THREAD) may share one
backend. Reads cost what they return: categories and streams are kept as their own
lists and found by bisection, never by scanning the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import time
from bisect import bisect_right
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from eventmill.backends.base import (
    Assign,
    Backend,
    Checkpoint,
    CheckpointStorage,
    ConsumerTransaction,
    EventNotifications,
    EventStorage,
    GroupStorage,
    GroupSummary,
    HoldingState,
    LagPlace,
    Lock,
    LockHolder,
    LockManager,
    NodeRecord,
    NodeStateStore,
    ParkedRequest,
    ParkedStream,
    ParkedStreamStorage,
    Projection,
    ProjectionFilterValue,
    ProjectionStorage,
    ProjectionVersion,
    ProjectionVersionStorage,
    Release,
    Remove,
    Revoke,
    SkippedEvent,
    SourceHolding,
    SourceLag,
    SubscriberRecord,
    SubscriberStateStore,
    SubscriptionChange,
    SubscriptionStateStore,
    VersionState,
    check_age,
    check_changes,
    check_requests,
)
from eventmill.backends.wakeups import WakeupRegistry
from eventmill.conditions import WriteCondition
from eventmill.errors import (
    ConflictError,
    GroupInUseError,
    InvalidInputError,
    InvalidSettingsError,
    StaleEpochError,
    UnmetWriteConditionError,
)
from eventmill.events import (
    PARTITION_BUCKETS,
    CategoryIdentifier,
    CategoryPartitionIdentifier,
    EventSourceIdentifier,
    JsonObject,
    LogIdentifier,
    NewEvent,
    StoredEvent,
    StreamIdentifier,
    check_name,
    new_event_id,
    new_event_ids,
    source_key,
    stored_event,
    stream_bucket,
)


def _sequence_number(event: StoredEvent) -> int:
    return event.sequence_number


class _Category:
    """The events of one category: all of them, each stream's, and each stream bucket's
    (a partition reads a merge of its buckets' lists)."""

    __slots__ = ("buckets", "events", "streams")

    def __init__(self) -> None:
        self.events: list[StoredEvent] = []
        self.buckets: list[list[StoredEvent]] = [[] for _ in range(PARTITION_BUCKETS)]
        self.streams: dict[str, tuple[list[StoredEvent], list[StoredEvent]]] = {}
        """A stream's events and its bucket's list, found together by one lookup:
        a publish neither hashes the stream name again nor looks its bucket up."""


class InMemoryEventStorage(EventStorage):
    """Events in lists: the log, and per category (``_Category``) the category's, each
    stream's and each stream bucket's."""

    def __init__(self, notifications: InMemoryEventNotifications | None = None) -> None:
        self._lock = threading.Lock()
        self._notifications = notifications
        self._log: list[StoredEvent] = []
        self._categories: dict[str, _Category] = {}

    async def publish(
        self,
        stream: StreamIdentifier,
        events: Sequence[NewEvent],
        condition: WriteCondition | None,
    ) -> list[StoredEvent]:
        return self.publish_now(stream, events, condition)

    def publish_now(
        self,
        stream: StreamIdentifier,
        events: Sequence[NewEvent],
        condition: WriteCondition | None,
    ) -> list[StoredEvent]:
        """``publish`` as a plain call: it never waits but for the lock, briefly, and
        raises what ``publish`` raises."""
        category_name, stream_name = stream.category, stream.stream
        count = len(events)
        ids = [new_event_id()] if count == 1 else new_event_ids(count)
        observed_at = datetime.now(UTC)
        with self._lock:
            # A new category is kept (below) only when the publish goes ahead.
            category = self._categories.get(category_name) or _Category()
            lists = category.streams.get(stream_name)
            if condition is not None:
                latest = None if lists is None else len(lists[0]) - 1  # never empty
                if latest not in condition.allowed:
                    raise UnmetWriteConditionError(condition, latest)
            if lists is None:
                self._categories[category_name] = category
                bucket = category.buckets[stream_bucket(stream_name)]
                lists = category.streams[stream_name] = ([], bucket)
            existing, bucket = lists
            position = len(existing)
            sequence_number = len(self._log) + 1
            if count == 1:  # the usual publish, without the comprehension's cost
                event = events[0]
                stored = [
                    stored_event(
                        ids[0],
                        event.name,
                        category_name,
                        stream_name,
                        position,
                        sequence_number,
                        event.payload,
                        event.metadata,
                        event.occurred_at,
                        observed_at,
                    )
                ]
            else:
                stored = [
                    stored_event(
                        ids[offset],
                        event.name,
                        category_name,
                        stream_name,
                        position + offset,
                        sequence_number + offset,
                        event.payload,
                        event.metadata,
                        event.occurred_at,
                        observed_at,
                    )
                    for offset, event in enumerate(events)
                ]
            self._log += stored
            category.events += stored
            existing += stored
            bucket += stored
        if self._notifications is not None:
            self._notifications.registry.wake(category_name)
        return stored

    async def read(
        self, source: EventSourceIdentifier, *, after: int | None, limit: int
    ) -> list[StoredEvent]:
        with self._lock:
            if isinstance(source, CategoryPartitionIdentifier):
                pages = [
                    _page_after_sequence_number(events, after, limit)
                    for events in self._bucket_lists(source)
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
                lasts = [events[-1] for events in self._bucket_lists(source) if events]
                return max(lasts, key=_sequence_number, default=None)
            events = self._events_of(source)
            return events[-1] if events else None

    async def lags(self, places: Sequence[LagPlace]) -> list[SourceLag]:
        """Counted by bisection in the sorted lists, reading no event."""
        found = []
        with self._lock:
            for source, after, through in places:
                stream = isinstance(source, StreamIdentifier)
                if isinstance(source, CategoryPartitionIdentifier):
                    lists = self._bucket_lists(source)
                else:
                    lists = [self._events_of(source)]
                count, newest, oldest_at = 0, None, None
                for events in lists:
                    if stream:
                        start = 0 if after is None else max(after + 1, 0)
                        end = len(events) if through is None else max(through + 1, 0)
                    else:
                        start = (
                            0
                            if after is None
                            else bisect_right(events, after, key=_sequence_number)
                        )
                        end = (
                            len(events)
                            if through is None
                            else bisect_right(events, through, key=_sequence_number)
                        )
                    end = min(end, len(events))
                    if start < len(events):
                        first = events[start].observed_at
                        oldest_at = first if oldest_at is None else min(oldest_at, first)
                    if end > start:
                        count += end - start
                        last = events[end - 1]
                        place = last.position if stream else last.sequence_number
                        newest = place if newest is None else max(newest, place)
                found.append(SourceLag(events=count, newest=newest, oldest_at=oldest_at))
        return found

    def _bucket_lists(self, source: CategoryPartitionIdentifier) -> list[list[StoredEvent]]:
        """The lists of the buckets of a partition (the category's list for one of one)."""
        category = self._categories.get(source.category)
        if category is None:
            return []
        if source.partitions == 1:
            return [category.events]
        return [category.buckets[bucket] for bucket in source.buckets]

    def _events_of(
        self, source: LogIdentifier | CategoryIdentifier | StreamIdentifier
    ) -> list[StoredEvent]:
        if isinstance(source, LogIdentifier):
            return self._log
        category = self._categories.get(source.category)
        if category is None:
            return []
        if isinstance(source, CategoryIdentifier):
            return category.events
        lists = category.streams.get(source.stream)
        return [] if lists is None else lists[0]


def _page_after_sequence_number(
    events: list[StoredEvent], after: int | None, limit: int
) -> list[StoredEvent]:
    start = 0 if after is None else bisect_right(events, after, key=_sequence_number)
    return events[start : start + limit]


# --- Checkpoints, projections and wake-ups (consumers) ---


class InMemoryEventNotifications(EventNotifications):
    """Wake-ups sent straight from ``InMemoryEventStorage.publish``."""

    def __init__(self) -> None:
        self.registry = WakeupRegistry()

    async def subscribe(
        self, source: EventSourceIdentifier, wake: Callable[[], None]
    ) -> Callable[[], None]:
        return self.registry.add(source, wake)


class InMemoryConsumerTransaction(ConsumerTransaction):
    """Writes apply at once and are undone, newest first, if the block raises. Not
    isolated from concurrent writers: a rollback restores what this transaction saw."""

    def __init__(self, checkpoints: InMemoryCheckpointStorage) -> None:
        self._checkpoints = checkpoints
        self.undo: list[Callable[[], None]] = []

    @property
    def connection(self) -> None:
        return None

    async def save_checkpoint(
        self,
        group: str,
        source: EventSourceIdentifier,
        after: int | None,
        *,
        expected_version: int | None,
        epoch: int | None = None,
    ) -> Checkpoint:
        return self._checkpoints.save_now(
            group, source, after, expected_version=expected_version, epoch=epoch, undo=self.undo
        )


class InMemoryCheckpointStorage(CheckpointStorage):
    """Checkpoints in a dict keyed by (group, source key)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], Checkpoint] = {}

    async def get(self, group: str, source: EventSourceIdentifier) -> Checkpoint | None:
        with self._lock:
            return self._records.get((group, source_key(source)))

    async def save(
        self,
        group: str,
        source: EventSourceIdentifier,
        after: int | None,
        *,
        expected_version: int | None,
        epoch: int | None = None,
    ) -> Checkpoint:
        return self.save_now(group, source, after, expected_version=expected_version, epoch=epoch)

    def save_now(
        self,
        group: str,
        source: EventSourceIdentifier,
        after: int | None,
        *,
        expected_version: int | None,
        epoch: int | None,
        undo: list[Callable[[], None]] | None = None,
    ) -> Checkpoint:
        """``save`` without awaiting; records how to undo it in ``undo`` when given."""
        key = (group, source_key(source))
        with self._lock:
            current = self._records.get(key)
            if epoch is not None and current is not None and current.epoch > epoch:
                raise StaleEpochError(
                    f"checkpoint of {group!r} for {source}: epoch {epoch} is older than "
                    f"{current.epoch}"
                )
            found = None if current is None else current.version
            if found != expected_version:
                raise ConflictError(
                    f"checkpoint of {group!r} for {source}: expected version "
                    f"{expected_version}, found {found}"
                )
            saved = Checkpoint(
                group=group,
                source=source,
                after=after,
                version=1 if current is None else current.version + 1,
                epoch=max(epoch or 0, 0 if current is None else current.epoch),
                updated_at=datetime.now(UTC),
            )
            self._records[key] = saved
        if undo is not None:
            undo.append(lambda: self._restore(key, saved, current))
        return saved

    def _restore(
        self, key: tuple[str, str], written: Checkpoint, previous: Checkpoint | None
    ) -> None:
        with self._lock:
            if self._records.get(key) is written:
                if previous is None:
                    del self._records[key]
                else:
                    self._records[key] = previous

    async def fence(self, group: str, source: EventSourceIdentifier, epoch: int) -> None:
        key = (group, source_key(source))
        with self._lock:
            current = self._records.get(key)
            if current is None:
                self._records[key] = Checkpoint(
                    group=group,
                    source=source,
                    after=None,
                    version=1,
                    epoch=epoch,
                    updated_at=datetime.now(UTC),
                )
            elif current.epoch < epoch:
                self._records[key] = replace(current, epoch=epoch, updated_at=datetime.now(UTC))

    async def reset(self, group: str, source: EventSourceIdentifier) -> None:
        key = (group, source_key(source))
        with self._lock:
            current = self._records.get(key)
            if current is not None:
                self._records[key] = replace(
                    current, after=None, version=current.version + 1, updated_at=datetime.now(UTC)
                )

    async def list(self, group: str | None = None) -> list[Checkpoint]:
        with self._lock:
            return [
                record
                for (record_group, _), record in sorted(self._records.items())
                if group is None or record_group == group
            ]

    async def places(self, group: str | None = None) -> dict[tuple[str, str], int | None]:
        with self._lock:
            return {
                key: record.after
                for key, record in self._records.items()
                if group is None or key[0] == group
            }

    @asynccontextmanager
    async def transaction(
        self, *, bound: timedelta | None = None
    ) -> AsyncIterator[InMemoryConsumerTransaction]:
        """``bound`` is ignored: nothing outside this process can be held up."""
        transaction = InMemoryConsumerTransaction(self)
        try:
            yield transaction
        except BaseException:
            for undo in reversed(transaction.undo):
                undo()
            raise


def _undo_list(transaction: ConsumerTransaction | None) -> list[Callable[[], None]] | None:
    if transaction is None:
        return None
    if not isinstance(transaction, InMemoryConsumerTransaction):
        raise InvalidInputError(f"not a transaction of this backend: {transaction!r:.80}")
    return transaction.undo


def _matches(state: JsonObject, where: Mapping[str, ProjectionFilterValue]) -> bool:
    for key, wanted in where.items():
        if key not in state:
            return False
        value = state[key]
        if isinstance(wanted, bool) or isinstance(value, bool) or wanted is None:
            if value is not wanted:
                return False
        elif value != wanted or not isinstance(value, type(wanted) | int | float):
            return False
    return True


class InMemoryProjectionStorage(ProjectionStorage):
    """Projection states in dicts; ``find`` scans the states of one name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, dict[str, Projection]] = {}

    async def get(
        self, name: str, id: str, *, transaction: ConsumerTransaction | None = None
    ) -> Projection | None:
        with self._lock:
            return self._states.get(name, {}).get(id)

    async def save(
        self,
        name: str,
        id: str,
        state: JsonObject,
        *,
        transaction: ConsumerTransaction | None = None,
    ) -> Projection:
        undo = _undo_list(transaction)
        with self._lock:
            states = self._states.setdefault(name, {})
            previous = states.get(id)
            saved = Projection(
                name=name,
                id=id,
                state=state,
                version=1 if previous is None else previous.version + 1,
                updated_at=datetime.now(UTC),
            )
            states[id] = saved
        if undo is not None:
            undo.append(lambda: self._restore(name, id, saved, previous))
        return saved

    async def delete(
        self, name: str, id: str, *, transaction: ConsumerTransaction | None = None
    ) -> bool:
        undo = _undo_list(transaction)
        with self._lock:
            previous = self._states.get(name, {}).pop(id, None)
        if previous is not None and undo is not None:
            undo.append(lambda: self._restore(name, id, None, previous))
        return previous is not None

    def _restore(
        self, name: str, id: str, written: Projection | None, previous: Projection | None
    ) -> None:
        with self._lock:
            states = self._states.setdefault(name, {})
            if states.get(id) is written:
                if previous is None:
                    states.pop(id, None)
                else:
                    states[id] = previous

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
        with self._lock:
            found = [
                p for p in self._states.get(name, {}).values() if _matches(p.state, where or {})
            ]
        found.sort(key=lambda p: p.id)
        if order_by is not None:
            present = [p for p in found if p.state.get(order_by) is not None]
            missing = [p for p in found if p.state.get(order_by) is None]
            present.sort(key=lambda p: p.state[order_by], reverse=descending)  # type: ignore[arg-type,return-value]
            found = present + missing
        return found[offset : offset + limit]


def _stream_order(record: ParkedStream) -> tuple[str, str, str, str]:
    return (record.group, source_key(record.source), record.stream.category, record.stream.stream)


class InMemoryParkedStreamStorage(ParkedStreamStorage):
    """Parked streams in a dict keyed by (group, source key, stream); skipped events in
    a list. Writes in a transaction are undone if it rolls back; a holder's writes are
    fenced by the epochs in ``checkpoints``."""

    def __init__(self, checkpoints: InMemoryCheckpointStorage) -> None:
        self._lock = threading.Lock()
        self._checkpoints = checkpoints
        self._records: dict[tuple[str, str, StreamIdentifier], ParkedStream] = {}
        self._skipped: list[SkippedEvent] = []

    def _fence(self, group: str, source: EventSourceIdentifier, epoch: int | None) -> None:
        """Raise StaleEpochError when the checkpoint of (group, source) is at a newer
        epoch than ``epoch`` (None: not fenced)."""
        if epoch is None:
            return
        with self._checkpoints._lock:
            current = self._checkpoints._records.get((group, source_key(source)))
        if current is not None and current.epoch > epoch:
            raise StaleEpochError(
                f"parked streams of {group!r} in {source}: epoch {epoch} is older than "
                f"{current.epoch}"
            )

    def _set(
        self, key: tuple[str, str, StreamIdentifier], record: ParkedStream | None
    ) -> ParkedStream | None:
        with self._lock:
            previous = self._records.pop(key, None)
            if record is not None:
                self._records[key] = record
            return previous

    def _write(
        self,
        key: tuple[str, str, StreamIdentifier],
        record: ParkedStream | None,
        transaction: ConsumerTransaction | None,
    ) -> ParkedStream | None:
        undo = _undo_list(transaction)
        previous = self._set(key, record)
        if undo is not None:

            def restore() -> None:
                self._set(key, previous)

            undo.append(restore)
        return previous

    async def park(
        self,
        record: ParkedStream,
        *,
        transaction: ConsumerTransaction | None = None,
        epoch: int | None = None,
    ) -> None:
        self._fence(record.group, record.source, epoch)
        key = (record.group, source_key(record.source), record.stream)
        with self._lock:
            current = self._records.get(key)
        if current is not None:
            record = replace(record, request=current.request, skip_through=current.skip_through)
        self._write(key, record, transaction)

    async def clear_request(
        self,
        group: str,
        source: EventSourceIdentifier,
        stream: StreamIdentifier,
        request: ParkedRequest,
        *,
        epoch: int | None = None,
    ) -> bool:
        self._fence(group, source, epoch)
        key = (group, source_key(source), stream)
        with self._lock:
            current = self._records.get(key)
            if current is None or current.request is not request:
                return False
            self._records[key] = replace(current, request=None, skip_through=None)
            return True

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
        self._fence(group, source, epoch)
        key = (group, source_key(source), stream)
        with self._lock:
            current = self._records.get(key)
        if current is None:
            return None
        counted = sum(1 for place in places if place > current.last_held)
        last = max([current.last_held, *places])
        self._write(key, replace(current, held=current.held + counted, last_held=last), transaction)
        return current.held + counted

    async def remove(
        self,
        group: str,
        source: EventSourceIdentifier,
        stream: StreamIdentifier,
        *,
        transaction: ConsumerTransaction | None = None,
        epoch: int | None = None,
    ) -> bool:
        self._fence(group, source, epoch)
        key = (group, source_key(source), stream)
        with self._lock:
            present = key in self._records
        if present:
            self._write(key, None, transaction)
        return present

    async def request(
        self,
        group: str,
        stream: StreamIdentifier,
        request: ParkedRequest,
        *,
        skip_through: int | None = None,
    ) -> int:
        with self._lock:
            keys = [k for k in self._records if k[0] == group and k[2] == stream]
            for key in keys:
                self._records[key] = replace(
                    self._records[key], request=request, skip_through=skip_through
                )
        return len(keys)

    async def record_skipped(
        self,
        event: SkippedEvent,
        *,
        transaction: ConsumerTransaction | None = None,
        epoch: int | None = None,
    ) -> None:
        self._fence(event.group, event.source, epoch)
        undo = _undo_list(transaction)
        with self._lock:
            self._skipped.append(event)
        if undo is not None:
            undo.append(lambda: self._forget(event))

    def _forget(self, event: SkippedEvent) -> None:
        with self._lock:
            for index in range(len(self._skipped) - 1, -1, -1):
                if self._skipped[index] is event:
                    del self._skipped[index]
                    return

    async def skipped(self, *, group: str | None = None) -> list[SkippedEvent]:
        with self._lock:
            found = [e for e in self._skipped if group is None or e.group == group]
        return sorted(found, key=lambda e: (e.group, e.skipped_at))

    async def list(
        self, *, group: str | None = None, source: EventSourceIdentifier | None = None
    ) -> list[ParkedStream]:
        with self._lock:
            found = [
                record
                for record in self._records.values()
                if (group is None or record.group == group)
                and (source is None or record.source == source)
            ]
        return sorted(found, key=_stream_order)


# --- Locks, subscriber state and subscription state (broker) ---


class _Signal:
    """Wakes every waiter, on whichever thread's event loop it waits, on ``fire()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[asyncio.Future[None], asyncio.AbstractEventLoop] = {}

    def waiter(self) -> asyncio.Future[None]:
        """Register a waiter now (before checking the condition, so no fire is missed)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._waiters[future] = loop
        return future

    async def wait(self, waiter: asyncio.Future[None], seconds: float | None) -> None:
        """Block until fired or ``seconds`` passed (None: no limit), then forget ``waiter``."""
        try:
            await asyncio.wait({waiter}, timeout=seconds)
        finally:
            self.discard(waiter)

    def discard(self, waiter: asyncio.Future[None]) -> None:
        with self._lock:
            self._waiters.pop(waiter, None)

    def fire(self) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, {}
        for future, loop in waiters.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class InMemoryLock(Lock):
    """A lock of an ``InMemoryLockManager``."""

    def __init__(self, manager: InMemoryLockManager, name: str) -> None:
        self._manager = manager
        self._name = name
        self._held = True

    @property
    def name(self) -> str:
        return self._name

    @property
    def is_held(self) -> bool:
        return self._held

    async def release(self) -> None:
        self._manager.drop(self)

    async def wait_lost(self) -> None:
        changed = self._manager.changed
        while True:
            waiter = changed.waiter()
            if not self._held:
                changed.discard(waiter)
                return
            await changed.wait(waiter, None)

    def mark_gone(self) -> None:
        self._held = False


class InMemoryLockManager(LockManager):
    """Locks of this process, shared by every thread using the backend."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders: dict[str, InMemoryLock] = {}
        self.changed = _Signal()

    async def try_lock(self, name: str, *, lease: timedelta | None = None) -> InMemoryLock | None:
        """See ``LockManager.try_lock``; the lease is checked and otherwise unused (one
        process cannot freeze apart from its locks)."""
        check_name(name, "lock name")
        if lease is not None and check_age(lease, "lease") <= timedelta(0):
            raise InvalidSettingsError(f"lease must be positive, not {lease}")
        with self._lock:
            if name in self._holders:
                return None
            lock = self._holders[name] = InMemoryLock(self, name)
            return lock

    async def wait_for_lock(
        self,
        name: str,
        timeout: timedelta,  # noqa: ASYNC109
        *,
        lease: timedelta | None = None,
    ) -> InMemoryLock | None:
        check_name(name, "lock name")
        deadline = time.monotonic() + check_age(timeout, "timeout").total_seconds()
        while True:
            waiter = self.changed.waiter()
            lock = await self.try_lock(name, lease=lease)
            remaining = deadline - time.monotonic()
            if lock is not None or remaining <= 0:
                self.changed.discard(waiter)
                return lock
            await self.changed.wait(waiter, remaining)

    async def holder(self, name: str) -> LockHolder | None:
        """A holder without session or application (this process holds every lock)."""
        check_name(name, "lock name")
        with self._lock:
            held = name in self._holders
        return LockHolder(session=None, application_name=None) if held else None

    def break_lock(self, name: str) -> None:
        """Make the lock ``name`` lost, as when a database connection dies: its holder's
        ``wait_lost()`` returns and others may take it. For tests."""
        with self._lock:
            lock = self._holders.pop(name, None)
            if lock is not None:
                lock.mark_gone()
        self.changed.fire()

    def drop(self, lock: InMemoryLock) -> None:
        """Release ``lock`` if it is still the holder of its name."""
        with self._lock:
            if self._holders.get(lock.name) is lock:
                del self._holders[lock.name]
            lock.mark_gone()
        self.changed.fire()


class InMemorySubscriberStateStore(SubscriberStateStore):
    """Subscriber records in a dict; ages by this process's clock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], SubscriberRecord] = {}

    async def register(
        self,
        group: str,
        id: str,
        node_id: str,
        subscription_requests: Sequence[EventSourceIdentifier],
    ) -> SubscriberRecord:
        return self._put(group, id, node_id, subscription_requests, keep_registration=False)

    async def heartbeat(
        self,
        group: str,
        id: str,
        node_id: str,
        subscription_requests: Sequence[EventSourceIdentifier],
    ) -> SubscriberRecord:
        return self._put(group, id, node_id, subscription_requests, keep_registration=True)

    def _put(
        self,
        group: str,
        id: str,
        node_id: str,
        subscription_requests: Sequence[EventSourceIdentifier],
        *,
        keep_registration: bool,
    ) -> SubscriberRecord:
        check_name(group, "group")
        check_name(id, "subscriber id")
        check_name(node_id, "node id")
        requests = check_requests(subscription_requests)
        with self._lock:
            now = datetime.now(UTC)
            old = self._records.get((group, id))
            record = self._records[group, id] = SubscriberRecord(
                group=group,
                id=id,
                node_id=node_id,
                subscription_requests=self._shared(group, old, requests),
                registered_at=old.registered_at if old and keep_registration else now,
                last_seen=now,
            )
            return record

    def _shared(
        self,
        group: str,
        old: SubscriberRecord | None,
        requests: tuple[EventSourceIdentifier, ...],
    ) -> tuple[EventSourceIdentifier, ...]:
        """An equal requests tuple already stored for ``group`` if there is one, else
        ``requests``: a group's records then share one tuple, which allocation compares
        by identity first (as records read from PostgreSQL do)."""
        candidates = [old] if old is not None else []
        candidates.extend(self._records.values())
        seen: set[int] = set()
        for record in candidates:
            stored = record.subscription_requests
            if record.group == group and id(stored) not in seen:
                seen.add(id(stored))
                if stored == requests:
                    return stored
        return requests

    async def remove(self, group: str, id: str) -> None:
        with self._lock:
            self._records.pop((group, id), None)

    async def list(
        self, *, group: str | None = None, max_age: timedelta | None = None
    ) -> list[SubscriberRecord]:
        if max_age is not None:
            check_age(max_age, "max_age")
        with self._lock:
            oldest = None if max_age is None else self._live_since(max_age) - max_age
            found = [
                record
                for record in self._records.values()
                if (group is None or record.group == group)
                and (oldest is None or record.last_seen >= oldest)
            ]
        return sorted(found, key=lambda r: (r.group, r.registered_at, r.id))

    def is_live(self, group: str, id: str, node_id: str, max_age: timedelta) -> bool:
        """Whether ``id`` of ``group`` has a record on ``node_id`` live for ``max_age``
        (how a coordinator tells a live holder). Never blocks."""
        with self._lock:
            record = self._records.get((group, id))
            oldest = self._live_since(max_age) - max_age
        return record is not None and record.node_id == node_id and record.last_seen >= oldest

    def _live_since(self, max_age: timedelta) -> datetime:
        """The freshest ``last_seen``, or now if that is earlier, but at most ``max_age``
        ago (hold the lock)."""
        now = datetime.now(UTC)
        freshest = max((r.last_seen for r in self._records.values()), default=now)
        return max(now - max_age, min(now, freshest))

    async def purge(self, max_age: timedelta) -> int:
        check_age(max_age, "max_age")
        with self._lock:
            oldest = self._live_since(max_age) - max_age
            dead = [key for key, record in self._records.items() if record.last_seen < oldest]
            for key in dead:
                del self._records[key]
        return len(dead)


class InMemorySubscriptionStateStore(SubscriptionStateStore):
    """Holdings in a dict keyed by (group, source). Takeovers are checked against
    ``subscribers`` (a store of its own if not given, in which nobody is live)."""

    def __init__(self, subscribers: InMemorySubscriberStateStore | None = None) -> None:
        self._lock = threading.Lock()
        self._holdings: dict[tuple[str, EventSourceIdentifier], SourceHolding] = {}
        self._subscribers = InMemorySubscriberStateStore() if subscribers is None else subscribers

    async def list(
        self, *, group: str | None = None, node_id: str | None = None
    ) -> list[SourceHolding]:
        with self._lock:
            found = [
                holding
                for holding in self._holdings.values()
                if (group is None or holding.group == group)
                and (node_id is None or holding.node_id == node_id)
            ]
        return sorted(found, key=lambda h: (h.group, source_key(h.source)))

    async def apply(self, changes: Sequence[SubscriptionChange]) -> None:
        checked = check_changes(changes)
        with self._lock:
            for change in checked:
                old = self._holdings.get((change.group, change.source))
                if isinstance(change, Assign) and old is not None and change.epoch <= old.epoch:
                    raise ConflictError(
                        f"{change.source} of group {change.group!r} is at epoch {old.epoch}:"
                        f" cannot assign epoch {change.epoch}"
                    )
            # The holdings stay locked until the batch is applied, so an observer round
            # begun after a heartbeat that raced a takeover's check sees the outcome.
            for change in checked:
                key = (change.group, change.source)
                old = self._holdings.get(key)
                if self._holder_is_live(change, old):
                    change = Revoke(group=change.group, source=change.source)
                if isinstance(change, Assign):
                    self._holdings[key] = SourceHolding(
                        group=change.group,
                        source=change.source,
                        subscriber_id=change.subscriber_id,
                        node_id=change.node_id,
                        epoch=change.epoch,
                        state=HoldingState.ASSIGNED,
                    )
                elif isinstance(change, Remove):
                    self._holdings.pop(key, None)
                elif old is None:
                    continue
                elif isinstance(change, Revoke):
                    if old.state is HoldingState.ASSIGNED:
                        self._holdings[key] = replace(old, state=HoldingState.REVOKING)
                elif old.subscriber_id == change.subscriber_id and change.epoch in (
                    None,
                    old.epoch,
                ):
                    self._holdings[key] = replace(
                        old, subscriber_id=None, node_id=None, state=HoldingState.RELEASED
                    )

    def _holder_is_live(self, change: SubscriptionChange, old: SourceHolding | None) -> bool:
        """Whether ``change`` takes ``old`` over from a holder that is live again."""
        age = change.holder_dead_after if isinstance(change, Assign | Release) else None
        return (
            age is not None
            and old is not None
            and old.subscriber_id is not None
            and old.node_id is not None
            and self._subscribers.is_live(old.group, old.subscriber_id, old.node_id, age)
        )


class InMemoryGroupStorage(GroupStorage):
    """Groups across the in-memory stores; each call holds their locks throughout (in
    the order subscriptions, subscribers, checkpoints), so it is atomic."""

    def __init__(
        self,
        events: InMemoryEventStorage,
        checkpoints: InMemoryCheckpointStorage,
        subscribers: InMemorySubscriberStateStore,
        subscriptions: InMemorySubscriptionStateStore,
        parked: InMemoryParkedStreamStorage,
    ) -> None:
        self._parked = parked
        self._events = events
        self._checkpoints = checkpoints
        self._subscribers = subscribers
        self._subscriptions = subscriptions

    def _summaries(self, max_age: timedelta) -> dict[str, GroupSummary]:
        oldest = datetime.now(UTC) - check_age(max_age, "max_age")
        counts: dict[str, list[int]] = {}
        for record in self._subscribers._records.values():
            count = counts.setdefault(record.group, [0, 0, 0, 0])
            count[0] += 1
            count[1] += record.last_seen >= oldest
        for group, _ in self._subscriptions._holdings:
            counts.setdefault(group, [0, 0, 0, 0])[2] += 1
        for group, _ in self._checkpoints._records:
            counts.setdefault(group, [0, 0, 0, 0])[3] += 1
        return {
            group: GroupSummary(group=group, subscribers=a, live=b, holdings=c, checkpoints=d)
            for group, (a, b, c, d) in sorted(counts.items())
        }

    async def overview(self, *, max_age: timedelta) -> list[GroupSummary]:
        with self._subscriptions._lock, self._subscribers._lock, self._checkpoints._lock:
            return list(self._summaries(max_age).values())

    async def retire(self, group: str, *, max_age: timedelta) -> GroupSummary:
        check_name(group, "group")
        with self._subscriptions._lock, self._subscribers._lock, self._checkpoints._lock:
            found = self._summaries(max_age).get(group)
            if found is None:
                return GroupSummary(group=group, subscribers=0, live=0, holdings=0, checkpoints=0)
            if found.live:
                raise GroupInUseError(
                    f"group {group!r} has {found.live} live subscribers: stop them first"
                )
            holdings = self._subscriptions._holdings
            for holding_key in [key for key in holdings if key[0] == group]:
                del holdings[holding_key]
            for records in (self._subscribers._records, self._checkpoints._records):
                for key in [key for key in records if key[0] == group]:
                    del records[key]
            with self._parked._lock:
                parked = self._parked._records
                for parked_key in [key for key in parked if key[0] == group]:
                    del parked[parked_key]
            return found

    async def reset(
        self,
        group: str,
        *,
        after: int | None,
        sources: Sequence[EventSourceIdentifier] | None = None,
    ) -> list[Checkpoint]:
        check_name(group, "group")
        chosen = None if sources is None else check_requests(sources)
        with self._subscriptions._lock, self._checkpoints._lock:
            holdings = self._subscriptions._holdings
            records = self._checkpoints._records
            if chosen is None:
                chosen = tuple(source for g, source in holdings if g == group)
                chosen += tuple(
                    record.source
                    for (g, _), record in records.items()
                    if g == group and (g, record.source) not in holdings
                )
            saved = []
            for source in sorted(set(chosen), key=source_key):
                key = (group, source_key(source))
                holding = holdings.get((group, source))
                current = records.get(key)
                epoch = 1 + max(
                    0 if holding is None else holding.epoch,
                    0 if current is None else current.epoch,
                )
                if holding is not None:
                    state = holding.state
                    if state is HoldingState.ASSIGNED:
                        state = HoldingState.REVOKING
                    holdings[(group, source)] = replace(holding, epoch=epoch, state=state)
                records[key] = checkpoint = Checkpoint(
                    group=group,
                    source=source,
                    after=self._place(source, after),
                    version=1 if current is None else current.version + 1,
                    epoch=epoch,
                    updated_at=datetime.now(UTC),
                    reset_pending=True,
                )
                saved.append(checkpoint)
                self._unpark(group, source, checkpoint.after)
            return saved

    def _unpark(self, group: str, source: EventSourceIdentifier, after: int | None) -> None:
        """Delete the parked streams of (group, source) whose first held event comes
        after the place ``after`` (all of them when None): the replay reaches it again."""
        by_position = isinstance(source, StreamIdentifier)
        with self._parked._lock:
            parked = self._parked._records
            for parked_key, record in list(parked.items()):
                first = record.position if by_position else record.sequence_number
                if (parked_key[0], parked_key[1]) == (group, source_key(source)) and (
                    after is None or first > after
                ):
                    del parked[parked_key]

    def _place(self, source: EventSourceIdentifier, after: int | None) -> int | None:
        if after is None or not isinstance(source, StreamIdentifier):
            return after
        with self._events._lock:
            events = self._events._events_of(source)
            positions = [e.position for e in events if e.sequence_number <= after]
        return positions[-1] if positions else None

    async def sequence_before(self, time: datetime) -> int | None:
        with self._events._lock:
            log = list(self._events._log)
        for event in log:
            if event.observed_at >= time:
                return event.sequence_number - 1
        return log[-1].sequence_number if log else None


class InMemoryNodeStateStore(NodeStateStore):
    """Node records in a dict; ages by this process's clock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, NodeRecord] = {}

    async def heartbeat(self, node_id: str, mode: str, *, leader_term: int | None) -> None:
        check_name(node_id, "node id")
        with self._lock:
            now = datetime.now(UTC)
            old = self._records.get(node_id)
            since = None
            if leader_term is not None:
                kept = old is not None and old.leader_term == leader_term
                since = old.leader_since if kept and old is not None else now
            self._records[node_id] = NodeRecord(
                node_id=node_id,
                mode=mode,
                started_at=now if old is None else old.started_at,
                last_seen=now,
                leader_term=leader_term,
                leader_since=since,
            )

    async def remove(self, node_id: str) -> None:
        with self._lock:
            self._records.pop(node_id, None)

    async def list(self) -> list[NodeRecord]:
        with self._lock:
            return [self._records[key] for key in sorted(self._records)]

    async def purge(self, max_age: timedelta) -> int:
        limit = datetime.now(UTC) - check_age(max_age, "max_age")
        with self._lock:
            old = [key for key, record in self._records.items() if record.last_seen < limit]
            for key in old:
                del self._records[key]
            return len(old)


class InMemoryProjectionVersionStorage(ProjectionVersionStorage):
    """Versions in a dict; there are no tables, so the alias is the SERVING record."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[tuple[str, int], ProjectionVersion] = {}

    def _newer_done(self, name: str, version: int) -> bool:
        return any(
            n == name and v > version and r.state is not VersionState.BUILDING
            for (n, v), r in self._records.items()
        )

    async def declare(self, name: str, version: int) -> ProjectionVersion:
        now = datetime.now(UTC)
        with self._lock:
            found = self._records.get((name, version))
            if found is not None:
                return found
            record = ProjectionVersion(
                name=name,
                version=version,
                state=VersionState.BUILDING,
                declared_at=now,
                changed_at=now,
            )
            if self._newer_done(name, version):
                return replace(record, state=VersionState.RETIRED)
            self._records[name, version] = record
            return record

    async def versions(self, name: str | None = None) -> list[ProjectionVersion]:
        with self._lock:
            return [r for key, r in sorted(self._records.items()) if name in (None, key[0])]

    async def report(
        self, name: str, version: int, *, behind: int, eta_seconds: float | None
    ) -> None:
        with self._lock:
            found = self._records.get((name, version))
            if found is not None and found.state is VersionState.BUILDING:
                self._records[name, version] = replace(
                    found, behind=behind, eta_seconds=eta_seconds
                )

    async def cut_over(self, name: str, version: int, *, grace: timedelta) -> bool:
        now = datetime.now(UTC)
        with self._lock:
            found = self._records.get((name, version))
            if found is None or found.state is not VersionState.BUILDING:
                return False
            if self._newer_done(name, version):
                return False
            for key, record in self._records.items():
                if key[0] == name and record.state is VersionState.SERVING:
                    self._records[key] = replace(
                        record,
                        state=VersionState.RETIRING,
                        changed_at=now,
                        retire_after=now + grace,
                    )
            self._records[name, version] = replace(
                found, state=VersionState.SERVING, changed_at=now, behind=0, eta_seconds=None
            )
            return True

    async def retire(self, name: str, version: int, *, now: bool = False) -> bool:
        moment = datetime.now(UTC)
        with self._lock:
            found = self._records.get((name, version))
            if found is None:
                return False
            due = found.state is VersionState.RETIRING and (
                now or (found.retire_after is not None and found.retire_after <= moment)
            )
            if not (due or (now and found.state is VersionState.BUILDING)):
                return False
            self._records[name, version] = replace(
                found, state=VersionState.RETIRED, changed_at=moment
            )
            return True


class InMemoryBackend(Backend):
    """Every port kept in this process. Constructing it does no I/O."""

    def __init__(self) -> None:
        self._notifications = InMemoryEventNotifications()
        self._events = InMemoryEventStorage(self._notifications)
        self._checkpoints = InMemoryCheckpointStorage()
        self._projections = InMemoryProjectionStorage()
        self._locks = InMemoryLockManager()
        self._subscribers = InMemorySubscriberStateStore()
        self._subscriptions = InMemorySubscriptionStateStore(self._subscribers)
        self._parked = InMemoryParkedStreamStorage(self._checkpoints)
        self._projection_versions = InMemoryProjectionVersionStorage()
        self._groups = InMemoryGroupStorage(
            self._events, self._checkpoints, self._subscribers, self._subscriptions, self._parked
        )
        self._nodes = InMemoryNodeStateStore()

    @property
    def events(self) -> InMemoryEventStorage:
        return self._events

    @property
    def notifications(self) -> InMemoryEventNotifications:
        return self._notifications

    @property
    def checkpoints(self) -> InMemoryCheckpointStorage:
        return self._checkpoints

    @property
    def projections(self) -> InMemoryProjectionStorage:
        return self._projections

    @property
    def locks(self) -> InMemoryLockManager:
        return self._locks

    @property
    def subscribers(self) -> InMemorySubscriberStateStore:
        return self._subscribers

    @property
    def subscriptions(self) -> InMemorySubscriptionStateStore:
        return self._subscriptions

    @property
    def parked(self) -> InMemoryParkedStreamStorage:
        return self._parked

    @property
    def groups(self) -> InMemoryGroupStorage:
        return self._groups

    @property
    def nodes(self) -> InMemoryNodeStateStore:
        return self._nodes

    @property
    def projection_versions(self) -> InMemoryProjectionVersionStorage:
        return self._projection_versions

    async def close(self) -> None:
        """Nothing to release; the data stays readable."""

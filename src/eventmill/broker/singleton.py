"""SingletonEventBroker: allocation inside one process, with no shared state.

Every subscriber of a group lives in this process, so the broker keeps the holdings
in memory and runs the pure allocation (``broker.allocation``) over its registered
subscribers whenever membership changes. It applies the result revoke-then-assign:
a source moving between subscribers is withdrawn from its holder (in-flight batch
finished, checkpoint saved) before it is accepted by the next one, under a greater
epoch at which its checkpoint was fenced first. Epochs continue from the epoch stored
in the checkpoint, so they keep growing across restarts on persistent storage.

Use it for a single process (the in-memory backend's default); several processes
sharing a PostgreSQL database need the distributed broker, since two singleton brokers
would both hand out every source.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from eventmill.backends.base import (
    Assign,
    Backend,
    HoldingState,
    Release,
    Remove,
    Revoke,
    SourceHolding,
    SubscriberRecord,
)
from eventmill.broker.allocation import allocate
from eventmill.broker.base import EventBroker
from eventmill.consumers.subscription_consumer import EventSubscriber, EventSubscriptionConsumer
from eventmill.errors import InvalidInputError, LifecycleError, StorageError
from eventmill.events import EventSourceIdentifier
from eventmill.services.status import ProcessStatus

logger = logging.getLogger(__name__)

_RETRY_FIRST = timedelta(milliseconds=100)
_RETRY_MAX = timedelta(seconds=5)


@dataclass(slots=True)
class _Member:
    subscriber: EventSubscriber
    record: SubscriberRecord


class SingletonEventBroker(EventBroker):
    """Allocates sources among the subscribers registered with it, in this process.

    ``node_id`` only labels the internal records. Construction does no I/O. A round
    that hits a StorageError (for example a checkpoint fence during a database outage)
    is retried with a growing delay (0.1 s doubling up to 5 s) while ``status`` is
    ERRORED; any other error ends ``execute()`` with it.
    """

    def __init__(self, backend: Backend, *, node_id: str = "singleton") -> None:
        if not isinstance(backend, Backend):
            raise InvalidInputError(f"a broker needs a Backend, not {backend!r:.80}")
        self.backend = backend
        self.node_id = node_id
        self._members: dict[tuple[str, str], _Member] = {}
        self._holdings: dict[tuple[str, EventSourceIdentifier], SourceHolding] = {}
        self._order = itertools.count()
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._requested = 0
        self._applied = -1
        self._progress = asyncio.Condition()
        self._status = ProcessStatus.INITIALISED
        self._failure: BaseException | None = None
        self._ended = False

    @property
    def status(self) -> ProcessStatus:
        return self._status

    @property
    def subscribers(self) -> list[EventSubscriber]:
        """The registered subscribers, in registration order."""
        return [member.subscriber for member in self._members.values()]

    def holdings(self) -> list[SourceHolding]:
        """Every (group, source) the broker knows of, by group then source."""
        return sorted(self._holdings.values(), key=lambda h: (h.group, str(h.source)))

    async def register(self, subscriber: EventSubscriber) -> None:
        """Add ``subscriber``; the next round gives it its share. Never blocks for long.
        Raises InvalidInputError for a (group, id) already registered,
        PartitioningChangedError when it partitions a category otherwise than the
        group's checkpoints."""
        if not isinstance(subscriber, EventSubscriber):
            raise InvalidInputError(f"not an EventSubscriber: {subscriber!r:.80}")
        key = (subscriber.group, subscriber.id)
        if isinstance(subscriber, EventSubscriptionConsumer) and key not in self._members:
            await subscriber.check_partitioning()
        async with self._lock:
            if key in self._members:
                raise InvalidInputError(
                    f"subscriber {subscriber.id!r} of group {subscriber.group!r} "
                    "is already registered"
                )
            # Registration order is what allocation ranks by: make it strict.
            registered = datetime(2000, 1, 1, tzinfo=UTC) + timedelta(
                microseconds=next(self._order)
            )
            self._members[key] = _Member(
                subscriber,
                SubscriberRecord(
                    group=subscriber.group,
                    id=subscriber.id,
                    node_id=self.node_id,
                    subscription_requests=tuple(subscriber.subscription_requests),
                    registered_at=registered,
                    last_seen=registered,
                ),
            )
            self._mark_changed()

    async def unregister(self, subscriber: EventSubscriber) -> None:
        """Withdraw every source ``subscriber`` holds, then forget it; the next round
        gives its sources to the rest of its group. Harmless if not registered."""
        key = (subscriber.group, subscriber.id)
        async with self._lock:
            member = self._members.pop(key, None)
            if member is None:
                return
            for holding in list(self._holdings.values()):
                if holding.group == subscriber.group and holding.subscriber_id == subscriber.id:
                    await subscriber.withdraw(holding.source)
                    self._set_released(holding)
            self._mark_changed()

    async def wait_ready(self) -> None:
        """Block until a round that saw every subscriber registered so far finished.
        Raises the failure that stopped the broker, LifecycleError once it stopped."""
        wanted = self._requested
        async with self._progress:
            await self._progress.wait_for(lambda: self._applied >= wanted or self._ended)
        if self._applied < wanted:
            if self._failure is not None:
                raise self._failure
            raise LifecycleError("the broker stopped before it was ready")

    async def execute(self) -> None:
        """Run rounds whenever membership changes, until cancelled."""
        if self._status is not ProcessStatus.INITIALISED:
            raise LifecycleError("a broker runs only once")
        self._status = ProcessStatus.WAITING
        self._changed.set()  # the first round runs at once, even with no subscribers
        failures = 0
        try:
            while True:
                await self._changed.wait()
                self._changed.clear()
                self._status = ProcessStatus.RUNNING
                seen = self._requested
                try:
                    await self._settle()
                except StorageError as error:
                    failures += 1
                    self._status = ProcessStatus.ERRORED
                    delay = min(_RETRY_FIRST * 2 ** (failures - 1), _RETRY_MAX)
                    logger.warning("allocation round failed, retrying in %s: %r", delay, error)
                    self._changed.set()
                    await asyncio.sleep(delay.total_seconds())
                    continue
                failures = 0
                self._status = ProcessStatus.WAITING
                await self._announce(seen)
        except BaseException as error:
            failed = not isinstance(error, asyncio.CancelledError)
            if failed:
                self._failure = error
            self._ended = True
            self._status = ProcessStatus.ERRORED if failed else ProcessStatus.STOPPED
            await asyncio.shield(self._announce(self._applied))
            raise

    def _mark_changed(self) -> None:
        self._requested += 1
        self._changed.set()

    async def _announce(self, applied: int) -> None:
        async with self._progress:
            self._applied = max(self._applied, applied)
            self._progress.notify_all()

    async def _settle(self) -> None:
        """Allocate and apply until every group is settled."""
        while True:
            async with self._lock:
                await self._load_checkpoint_epochs()
                records = [member.record for member in self._members.values()]
                decisions = allocate(records, list(self._holdings.values()))
                if all(decision.settled for decision in decisions):
                    return
                for decision in decisions:
                    for change in decision.changes:
                        await self._apply(change)

    async def _load_checkpoint_epochs(self) -> None:
        """Know every requested source, released at its checkpoint's epoch, so new
        epochs continue from what storage remembers."""
        for member in self._members.values():
            for source in member.record.subscription_requests:
                key = (member.record.group, source)
                if key not in self._holdings:
                    checkpoint = await self.backend.checkpoints.get(member.record.group, source)
                    self._holdings[key] = SourceHolding(
                        group=member.record.group,
                        source=source,
                        subscriber_id=None,
                        node_id=None,
                        epoch=0 if checkpoint is None else checkpoint.epoch,
                        state=HoldingState.RELEASED,
                    )

    async def _apply(self, change: Assign | Revoke | Release | Remove) -> None:
        key = (change.group, change.source)
        holding = self._holdings.get(key)
        if isinstance(change, Assign):
            member = self._members[(change.group, change.subscriber_id)]
            await self.backend.checkpoints.fence(change.group, change.source, change.epoch)
            await member.subscriber.accept(change.source, change.epoch)
            self._holdings[key] = SourceHolding(
                group=change.group,
                source=change.source,
                subscriber_id=change.subscriber_id,
                node_id=self.node_id,
                epoch=change.epoch,
                state=HoldingState.ASSIGNED,
            )
        elif isinstance(change, Revoke):
            assert holding is not None and holding.subscriber_id is not None
            member = self._members[(change.group, holding.subscriber_id)]
            await member.subscriber.withdraw(change.source)
            self._set_released(holding)
        elif isinstance(change, Release):
            if holding is not None:
                self._set_released(holding)
        else:
            self._holdings.pop(key, None)

    def _set_released(self, holding: SourceHolding) -> None:
        self._holdings[(holding.group, holding.source)] = SourceHolding(
            group=holding.group,
            source=holding.source,
            subscriber_id=None,
            node_id=None,
            epoch=holding.epoch,
            state=HoldingState.RELEASED,
        )

    def __repr__(self) -> str:
        return f"<SingletonEventBroker {self.node_id} {len(self._members)} subscribers>"

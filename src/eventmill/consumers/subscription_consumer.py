"""Subscribers: EventSubscriber (what a broker drives), EventSubscriptionConsumer (the
subscriber that consumes what it holds) and make_subscriber.

A broker assigns sources to subscribers: ``accept(source, epoch)`` after it fenced the
source's checkpoint at ``epoch``; ``withdraw(source)`` when the source moves away, which
returns only once the source's in-flight batch is finished and its checkpoint saved.
Each held source has its own ``EventSourceConsumer`` and checkpoint; ``consume_all``
runs one pass over each in turn.

Ownership lease: a distributed broker gives its subscribers an ``OwnershipLease``
(``lease``), which every delegate consumer checks before each event, so a subscriber
of a node that was paused or cut off too long stops mid-pass (see
``consumers.lease``). Without one (singleton broker) the lease is always valid.

Failures: with a ``failure_policy`` each delegate consumer handles its processor's
failures (``consumers.failures``); a pass first reads the group's parked streams in
one query and hands each consumer its own, but only while one is parked (operators'
requests) or after a source was accepted (its previous holder may have parked one):
with nothing parked, a pass costs no extra query. A policy that stops the group makes this
subscriber stop processing (its status ERRORED) while it keeps its sources; its
health is DEGRADED while a held source has a parked stream or an event waiting for
another try.

Wake-ups: every held source is watched (``Backend.notifications``); a publish that
may concern one ends ``wait_for_new_events`` early and calls the ``on_new_events``
callbacks (for example ``PollingService.wake``). Polling stays the fallback.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from eventmill.backends.base import Backend, ParkedStream
from eventmill.consumers.failures import FailurePolicy
from eventmill.consumers.lease import OwnershipLease
from eventmill.consumers.processors import Processor
from eventmill.consumers.source_consumer import (
    ConsumerSettings,
    EventSourceConsumer,
    check_processor,
)
from eventmill.consumers.state import EventConsumerStateStore
from eventmill.errors import InvalidInputError, ProcessorFailedError, StaleEpochError
from eventmill.events import EventSourceIdentifier, check_identifier, check_name
from eventmill.partitions import check_partitioning, partition_requests
from eventmill.services.service import Service
from eventmill.services.status import ProcessStatus
from eventmill.sources import EventSource
from eventmill.store import DEFAULT_PAGE_SIZE, check_page_size

logger = logging.getLogger(__name__)


@runtime_checkable
class EventSubscriber(Protocol):
    """One instance of a subscriber group, as a broker sees it."""

    @property
    def group(self) -> str:
        """The subscriber group (a kind of work)."""
        ...

    @property
    def id(self) -> str:
        """This instance's id, unique within the group."""
        ...

    @property
    def subscription_requests(self) -> Sequence[EventSourceIdentifier]:
        """The sources this instance asks for."""
        ...

    async def accept(self, source: EventSourceIdentifier, epoch: int) -> None:
        """Start holding ``source``; later checkpoint saves carry ``epoch``. Harmless if
        held (the epoch is raised)."""
        ...

    async def withdraw(self, source: EventSourceIdentifier) -> None:
        """Stop holding ``source``; returns after its in-flight batch finished and its
        checkpoint was saved. Harmless if not held."""
        ...

    async def take_dropped(self) -> dict[EventSourceIdentifier, int]:
        """The sources this instance stopped holding by itself since the last call
        (their checkpoint was fenced at a newer epoch), each with the epoch it was held
        at; they are forgotten here. The broker releases them so they can be assigned
        again under a newer epoch."""
        ...

    def health(self) -> ProcessStatus:
        """The subscriber's status."""
        ...


@dataclass(slots=True)
class _Holding:
    consumer: EventSourceConsumer
    epoch: int
    unwatch: Callable[[], None]


class EventSubscriptionConsumer(Service[int]):
    """A subscriber consuming each source it holds with its own delegate consumer.

    ``processor_factory(source)`` makes the processor of a newly accepted source.
    ``reset_repartitioned``: see ``check_partitioning``. ``lease``: see the module
    docstring. Construction does no I/O.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        group: str,
        id: str,
        subscription_requests: Sequence[EventSourceIdentifier],
        processor_factory: Callable[[EventSourceIdentifier], Processor],
        settings: ConsumerSettings | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        reset_repartitioned: bool = False,
        lease: OwnershipLease | None = None,
        failure_policy: FailurePolicy | None = None,
    ) -> None:
        if not isinstance(backend, Backend):
            raise InvalidInputError(f"a subscriber needs a Backend, not {backend!r:.80}")
        if isinstance(subscription_requests, str) or not isinstance(
            subscription_requests, Sequence
        ):
            raise InvalidInputError(
                "subscription_requests must be a sequence of identifiers, not "
                f"{subscription_requests!r:.80}"
            )
        requests = tuple(dict.fromkeys(check_identifier(s) for s in subscription_requests))
        if not requests:
            raise InvalidInputError("subscription_requests must name at least one source")
        if not callable(processor_factory):
            raise InvalidInputError(
                f"processor_factory must be callable: {processor_factory!r:.80}"
            )
        self.backend = backend
        self._group = check_name(group, "group")
        self._id = check_name(id, "subscriber id")
        self._requests = requests
        self._processor_factory = processor_factory
        self.settings = settings or ConsumerSettings()
        self.page_size = check_page_size(page_size)
        if type(reset_repartitioned) is not bool:
            raise InvalidInputError(
                f"reset_repartitioned must be a bool, not {reset_repartitioned!r:.80}"
            )
        self.reset_repartitioned = reset_repartitioned
        self._holdings: dict[EventSourceIdentifier, _Holding] = {}
        self._dropped: dict[EventSourceIdentifier, int] = {}  # see take_dropped
        self._lease: OwnershipLease | None = None
        self.lease = lease
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._tokens = itertools.count()
        self._new_events: asyncio.Event | None = None
        self._status = ProcessStatus.INITIALISED
        if failure_policy is not None and not isinstance(failure_policy, FailurePolicy):
            raise InvalidInputError(
                f"failure_policy must be a FailurePolicy, not {failure_policy!r:.80}"
            )
        self.failure_policy = failure_policy
        self._parked_unknown = True
        self.stopped_by: ProcessorFailedError | None = None
        """The failure that stopped this subscriber (policy STOP_GROUP), or None."""
        self.events_failed = 0
        """Times the processor raised for an event, over every source held (see
        ``EventSourceConsumer.on_event_failed``)."""

    @property
    def group(self) -> str:
        return self._group

    @property
    def id(self) -> str:
        return self._id

    @property
    def subscription_requests(self) -> Sequence[EventSourceIdentifier]:
        return self._requests

    @property
    def sources(self) -> Mapping[EventSourceIdentifier, int]:
        """The held sources and the epoch of each (a read-only snapshot)."""
        return MappingProxyType({source: h.epoch for source, h in self._holdings.items()})

    @property
    def lease(self) -> OwnershipLease | None:
        """The ownership lease every held source's consumer checks (None: always valid)."""
        return self._lease

    @lease.setter
    def lease(self, lease: OwnershipLease | None) -> None:
        if lease is not None and not isinstance(lease, OwnershipLease):
            raise InvalidInputError(f"lease must be an OwnershipLease, not {lease!r:.80}")
        self._lease = lease
        for holding in self._holdings.values():
            holding.consumer.lease = lease

    async def check_partitioning(self) -> None:
        """Brokers call this at registration: raise PartitioningChangedError when the
        requests partition a category otherwise than the group's stored checkpoints,
        or, with ``reset_repartitioned``, reset those checkpoints (the category is
        processed again from the start). See ``eventmill.partitions``. Blocks for a
        checkpoint listing; raises StorageError."""
        await check_partitioning(
            self.backend.checkpoints, self._group, self._requests, reset=self.reset_repartitioned
        )

    def consumer_of(self, source: EventSourceIdentifier) -> EventSourceConsumer | None:
        """The delegate consumer of a held source, or None."""
        holding = self._holdings.get(source)
        return None if holding is None else holding.consumer

    async def accept(self, source: EventSourceIdentifier, epoch: int) -> None:
        """Hold ``source`` from now on, saving its checkpoint with ``epoch``; when already
        held, only raise its epoch. Raises InvalidInputError for a bad source or epoch."""
        source = check_identifier(source)
        if type(epoch) is not int or epoch < 0:
            raise InvalidInputError(f"epoch must be an int >= 0, not {epoch!r:.80}")
        self._dropped.pop(source, None)
        holding = self._holdings.get(source)
        if holding is not None:
            holding.epoch = max(holding.epoch, epoch)
            holding.consumer.state_store.epoch = holding.epoch
            return
        state = EventConsumerStateStore(self.backend.checkpoints, self._group, source, epoch=epoch)
        consumer = EventSourceConsumer(
            EventSource(self.backend, source, page_size=self.page_size, shared_tail=True),
            check_processor(self._processor_factory(source)),
            state,
            settings=self.settings,
            lease=self._lease,
            failure_policy=self.failure_policy,
        )
        consumer.on_retry_due = self._wake
        consumer.on_event_failed = self._count_failure
        self._holdings[source] = _Holding(consumer, epoch, lambda: None)
        self._parked_unknown = True
        unwatch = await consumer.source.watch(self._wake)
        if self._holdings.get(source) is None:  # withdrawn while the watch was set up
            unwatch()
        else:
            self._holdings[source].unwatch = unwatch
        self._wake()

    def _count_failure(self) -> None:
        self.events_failed += 1

    async def withdraw(self, source: EventSourceIdentifier) -> None:
        """Stop holding ``source``: its running pass ends at the next event boundary
        and saves its checkpoint; returns after that. Harmless if not held."""
        holding = self._holdings.pop(source, None)
        if holding is None:
            return
        holding.unwatch()
        holding.consumer.stop()
        await holding.consumer.wait_pass_finished()

    async def take_dropped(self) -> dict[EventSourceIdentifier, int]:
        """The sources dropped on a StaleEpochError since the last call, with the epoch
        each was held at (see ``EventSubscriber.take_dropped``). Does not block."""
        dropped, self._dropped = self._dropped, {}
        return dropped

    async def withdraw_all(self) -> None:
        """Withdraw every held source (for a graceful shutdown)."""
        for source in list(self._holdings):
            await self.withdraw(source)

    async def consume_all(self) -> int:
        """One pass over every held source; return how many events were processed.

        A source whose checkpoint was fenced by a newer epoch (StaleEpochError) has
        moved away, or is about to: it is dropped and reported by ``take_dropped``, so
        that the broker releases it even if the move it was fenced for was never
        applied. Other errors are raised at once (after the failing
        source saved its progress).
        """
        if self._new_events is not None:
            self._new_events.clear()
        if self.stopped_by is not None:
            return 0
        self._status = ProcessStatus.RUNNING
        total = 0
        try:
            parked: dict[EventSourceIdentifier, list[ParkedStream]] | None = None
            if self.failure_policy is not None and self._holdings:
                parked = {s: list(h.consumer.parked) for s, h in self._holdings.items()}
                if self._parked_unknown or any(parked.values()):
                    self._parked_unknown = False
                    parked = {source: [] for source in self._holdings}
                    for record in await self.backend.parked.list(group=self._group):
                        parked.setdefault(record.source, []).append(record)
            for source, holding in list(self._holdings.items()):
                if self._holdings.get(source) is not holding:
                    continue
                try:
                    total += await holding.consumer.consume_all(
                        None if parked is None else parked.get(source, [])
                    )
                except ProcessorFailedError as failure:
                    if failure.stops_node:
                        raise
                    self.stopped_by = failure
                    self._status = ProcessStatus.ERRORED
                    return total
                except StaleEpochError:
                    logger.warning("%s/%s lost %s to a newer epoch", self._group, self._id, source)
                    if self._holdings.get(source) is holding:
                        del self._holdings[source]
                        holding.unwatch()
                        self._dropped[source] = holding.epoch
        except BaseException:
            self._status = ProcessStatus.ERRORED
            raise
        self._status = ProcessStatus.WAITING
        return total

    async def execute(self) -> int:
        """``consume_all()``, so a PollingService can run this subscriber."""
        return await self.consume_all()

    def health(self) -> ProcessStatus:
        """INITIALISED before the first pass, RUNNING during one, WAITING between passes,
        ERRORED after a pass that raised (until one succeeds) and once stopped by its
        failure policy; DEGRADED instead of WAITING or RUNNING while a held source has a
        parked stream or an event waiting for another try."""
        if self.stopped_by is not None:
            return ProcessStatus.ERRORED
        if self._status in (ProcessStatus.WAITING, ProcessStatus.RUNNING) and self.degraded:
            return ProcessStatus.DEGRADED
        return self._status

    @property
    def degraded(self) -> bool:
        """Whether a held source has a parked stream or an event waiting for a try."""
        return any(h.consumer.parked or h.consumer.retrying for h in self._holdings.values())

    @property
    def parked(self) -> tuple[ParkedStream, ...]:
        """The parked streams of the held sources, as of their last passes."""
        return tuple(r for h in self._holdings.values() for r in h.consumer.parked)

    @property
    def status(self) -> ProcessStatus:
        return self.health()

    def on_new_events(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` whenever a held source may have new events; return the
        function that stops it. Callbacks run on this subscriber's loop and must not block."""
        token = next(self._tokens)
        self._callbacks[token] = callback

        def remove() -> None:
            self._callbacks.pop(token, None)

        return remove

    async def wait_for_new_events(self, within: timedelta) -> bool:
        """Wait until a held source may have new events since the last pass began, at
        most ``within``; return whether that happened (False: the time ran out)."""
        woken = self._woken_event()
        try:
            async with asyncio.timeout(within.total_seconds()):
                await woken.wait()
        except TimeoutError:
            return False
        return True

    def _woken_event(self) -> asyncio.Event:
        if self._new_events is None:
            self._new_events = asyncio.Event()
        return self._new_events

    def _wake(self) -> None:
        self._woken_event().set()
        for callback in list(self._callbacks.values()):
            callback()

    def __repr__(self) -> str:
        return f"<EventSubscriptionConsumer {self._group}/{self._id} holding {len(self._holdings)}>"


def make_subscriber(
    backend: Backend,
    *,
    group: str,
    sources: EventSourceIdentifier | Sequence[EventSourceIdentifier],
    processor: Processor,
    id: str | None = None,
    checkpoint_every: int = 100,
    page_size: int = DEFAULT_PAGE_SIZE,
    partitions: int | None = None,
    reset_repartitioned: bool = False,
    failure_policy: FailurePolicy | None = None,
) -> EventSubscriptionConsumer:
    """A subscriber of ``group`` asking for ``sources``, feeding every source it is
    given to the one ``processor`` (passes run one source at a time). ``id`` defaults
    to the group plus a random suffix. With ``partitions=N`` each category source is
    asked for as its N partitions, which the group's instances share (N a power of two
    up to 64; changing it later is refused unless ``reset_repartitioned``, see
    ``eventmill.partitions``). ``failure_policy``: see ``consumers.failures`` (None:
    the processor's exceptions leave the pass). Raises InvalidInputError for bad
    arguments."""
    requests = [sources] if not isinstance(sources, Sequence) else list(sources)
    requests = partition_requests(requests, partitions)
    chosen = check_processor(processor)
    return EventSubscriptionConsumer(
        backend,
        group=group,
        id=id if id is not None else f"{group}-{uuid.uuid4().hex[:12]}",
        subscription_requests=requests,
        processor_factory=lambda _source: chosen,
        settings=ConsumerSettings(checkpoint_every=checkpoint_every),
        page_size=page_size,
        reset_repartitioned=reset_repartitioned,
        failure_policy=failure_policy,
    )

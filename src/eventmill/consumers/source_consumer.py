"""EventSourceConsumer: feeds one source to one processor and keeps its checkpoint.

A pass (``consume_all``) resumes after the stored checkpoint, reads page by page until
the source is drained (reading the next page while it processes one, and taking each
page in batches that PostgreSQL decodes only as they come up), and saves the
checkpoint every ``checkpoint_every`` processed events, each save committing while the
next events are processed, and at the end of the pass. So after a crash at most twice
``checkpoint_every`` events are delivered again (at-least-once); with a
``TransactionalEventProcessor`` on PostgreSQL none are (exactly-once): its checkpoint
commits with its batch. When the processor raises, the checkpoint of the
events processed before the failure is saved and the exception re-raised.

``stop()`` ends the running pass at the next event boundary (a transactional batch is
finished first; the pass still saves its checkpoint before it returns) and makes later
passes return at once: a stopped consumer stays stopped.

With an ``OwnershipLease`` (a distributed broker's subscribers have one), the consumer
checks it before every event (and before every transactional batch): once the lease
has expired the pass ends there, saving the checkpoint of what it did process (a
fenced save is refused), and every later pass ends at once until the lease is valid
again. So a process paused longer than the lease (SIGSTOP) does not process a single
further event of a source that may have moved meanwhile; only an event whose
processing had already begun when it was paused completes (see ``consumers.lease``).

With a ``FailurePolicy`` (``failure_policy``), an exception from the processor (other
than StorageError and ConflictError) is not raised: the event is retried after a
backoff, then parked, skipped, or the pass raises ProcessorFailedError (see
``consumers.failures``). The failing event is known exactly: for a per-event processor
it is the one given; for an auto-commit iterator processor the one pulled last (the
only one not yet counted processed). A failing transactional batch is rolled back and
its events are then processed one per transaction, and a managed iterator processor
that raised with several pulled events unacknowledged is given them one per
``process`` call, until the failing one is passed. Replayed held events reach an
iterator processor the same way, alone (each handled once its call returns). Before
each pass the consumer learns its parked streams (one read, or given by its
subscriber) and carries out operators' retry and skip requests first.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import traceback
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import AbstractContextManager, aclosing, nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from eventmill.backends.base import (
    Checkpoint,
    ConsumerTransaction,
    ParkedRequest,
    ParkedStream,
    SkippedEvent,
)
from eventmill.consumers.failures import FailureAction, FailurePolicy, one_line, where
from eventmill.consumers.lease import OwnershipLease
from eventmill.consumers.processors import (
    AutoCommitEventIteratorProcessor,
    ConsumerProgress,
    EventProcessor,
    ManagedEventIteratorProcessor,
    ProcessEventFunction,
    Processor,
    TransactionalEventProcessor,
)
from eventmill.consumers.state import EventConsumerStateStore
from eventmill.errors import (
    ConflictError,
    InvalidInputError,
    InvalidSettingsError,
    ProcessorFailedError,
    StorageError,
    describe,
)
from eventmill.events import EventSourceIdentifier, StoredEvent, StreamIdentifier
from eventmill.sources import EventSource

logger = logging.getLogger(__name__)

DECODE_BATCH = 100
"""Events per list a page is handed out in (``_pages``): on PostgreSQL decoding 100
takes 0.15-0.3 ms here, less than a checkpoint commit's round trip."""

_TRACEBACK_LIMIT = 20_000
"""Characters of a traceback kept in a parked record."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumerSettings:
    """How often a consumer saves its checkpoint.

    ``checkpoint_every``: save after this many processed events (1 to 10,000; also the
    size of a transactional batch). ``checkpoint_at_end``: save at the end of each pass
    too (a pass ended by ``stop()`` or a failure always saves).
    """

    checkpoint_every: int = 100
    checkpoint_at_end: bool = True

    def __post_init__(self) -> None:
        if type(self.checkpoint_every) is not int or not 1 <= self.checkpoint_every <= 10_000:
            raise InvalidSettingsError(
                "checkpoint_every must be an int from 1 to 10000,"
                f" not {describe(self.checkpoint_every)}"
            )
        if type(self.checkpoint_at_end) is not bool:
            raise InvalidSettingsError(
                f"checkpoint_at_end must be a bool, not {describe(self.checkpoint_at_end)}"
            )


def check_processor(processor: object) -> Processor:
    """Return ``processor`` if it is one of the processor kinds; raise InvalidInputError."""
    if isinstance(
        processor,
        EventProcessor
        | AutoCommitEventIteratorProcessor
        | ManagedEventIteratorProcessor
        | TransactionalEventProcessor,
    ):
        return processor
    if callable(processor) and inspect.iscoroutinefunction(processor):
        return processor
    raise InvalidInputError(
        "a processor is an EventProcessor, an iterator or transactional processor, or an "
        f"async function taking an event, not {processor!r:.80}"
    )


@dataclass(slots=True)
class _Failing:
    """The event being retried: its place and stream, tries so far, when to try again,
    and whether its tries are stored (a parked record with nothing held)."""

    place: int
    stream: StreamIdentifier
    attempts: int
    first_failed_at: datetime
    retry_at: float
    stored: bool = False


def _stream_key(event: StoredEvent) -> tuple[str, str]:
    return (event.category, event.stream)


def _no_context(events: Sequence[StoredEvent]) -> AbstractContextManager[None]:
    return nullcontext()


def _is_storage_failure(error: Exception) -> bool:
    return isinstance(error, StorageError | ConflictError)


class EventSourceConsumer:
    """Feeds ``source`` to ``processor``, checkpointing through ``state_store``; with a
    ``lease``, only while the lease is valid; with a ``failure_policy``, handling the
    processor's failures (see the module docstring)."""

    def __init__(
        self,
        source: EventSource,
        processor: Processor,
        state_store: EventConsumerStateStore,
        *,
        settings: ConsumerSettings | None = None,
        lease: OwnershipLease | None = None,
        failure_policy: FailurePolicy | None = None,
    ) -> None:
        if not isinstance(source, EventSource):
            raise InvalidInputError(f"source must be an EventSource, not {source!r:.80}")
        if not isinstance(state_store, EventConsumerStateStore):
            raise InvalidInputError(
                f"state_store must be an EventConsumerStateStore: {state_store!r:.80}"
            )
        self.source = source
        self.processor = check_processor(processor)
        self.state_store = state_store
        self.settings = settings or ConsumerSettings()
        self.lease = lease
        """Checked before every event; None: always allowed (singleton broker)."""
        self._pass_lock = asyncio.Lock()
        self._loaded = False
        self._processed: int | None = None
        self._unsaved = 0
        self._count = 0
        self._stop = False
        if failure_policy is not None and not isinstance(failure_policy, FailurePolicy):
            raise InvalidInputError(
                f"failure_policy must be a FailurePolicy, not {failure_policy!r:.80}"
            )
        self.failure_policy = failure_policy
        """None: the processor's exceptions leave the pass."""
        self.on_retry_due: Callable[[], None] | None = None
        """Called (on the consumer's loop) when a backoff ends, e.g. to wake a poller."""
        self.on_event_failed: Callable[[], None] | None = None
        """Called each time the processor raised for an event (each try; without a
        failure policy, a transactional batch that raised counts once), for metrics."""
        self._parked: dict[tuple[str, str], ParkedStream] = {}
        self._parked_names: frozenset[str] = frozenset()
        self._pending_holds: dict[tuple[str, str], list[int]] = {}
        self._recounted: set[tuple[str, str]] = set()
        self._failing: _Failing | None = None
        self._narrow_until: int | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._saving: asyncio.Task[Checkpoint] | None = None
        """The checkpoint save in flight (see ``_save_behind``), of ``_saving_count``
        events."""
        self._saving_count = 0

    @property
    def parked(self) -> tuple[ParkedStream, ...]:
        """The streams parked in this source, as of the last pass."""
        return tuple(self._parked.values())

    @property
    def retrying(self) -> bool:
        """Whether an event failed and waits for another try."""
        return self._failing is not None

    @property
    def processed(self) -> int | None:
        """The place of the last processed event (None before the first)."""
        return self._processed

    def stop(self) -> None:
        """End the running pass (if any) at the next event boundary, saving first, and
        every later pass at once. Never blocks; see ``wait_pass_finished``."""
        self._stop = True
        if self._retry_timer is not None:
            self._retry_timer.cancel()

    @property
    def _group(self) -> str:
        return self.state_store.group

    @property
    def _source(self) -> EventSourceIdentifier:
        return self.source.identifier

    @property
    def _epoch(self) -> int | None:
        """The epoch this consumer holds its source at, which fences its parked writes."""
        return self.state_store.epoch

    def _bound(self) -> timedelta | None:
        """How long a transaction of this consumer may stay open: the lease margin."""
        return None if self.lease is None else self.lease.margin

    def _halted(self) -> bool:
        """Whether the pass must end before the next event: stopped, or lease expired."""
        return self._stop or (self.lease is not None and not self.lease.is_valid())

    async def wait_pass_finished(self) -> None:
        """Return once no pass is running (its checkpoint saved or its error raised)."""
        async with self._pass_lock:
            pass

    async def consume_all(self, parked: Sequence[ParkedStream] | None = None) -> int:
        """One pass: process every event after the checkpoint; return how many (held
        events included).

        ``parked``: this source's parked streams, when the caller read them (else, with
        a failure policy, the pass reads them). Ends early (after saving) when stopped,
        when the lease expires, or when an event waits for another try; returns at
        once while that wait lasts. Raises what the processor raised (without a failure
        policy; after saving the progress before it), ProcessorFailedError (a policy
        that stops), ConflictError or StaleEpochError when the checkpoint moved under us
        (the next pass resumes from what is stored), StorageError.
        """
        async with self._pass_lock:
            if self._stop:
                return 0
            policy = self.failure_policy
            failing = self._failing
            if policy is not None and failing is not None and policy.clock() < failing.retry_at:
                return 0
            if not self._loaded:
                self._processed = await self.state_store.load()
                self._unsaved = 0
                self._loaded = True
            self._count = 0
            try:
                if policy is not None:
                    await self._learn_parked(parked)
                    if not await self._serve_requests():
                        return self._count
                await self._run_processor()
                if self._pending_holds:
                    await self._save_holds(None)
                if self._unsaved and (self.settings.checkpoint_at_end or self._stop):
                    await self._save()
                await self._saved()
            except BaseException as error:
                if isinstance(error, ConflictError):
                    await self._end_saving_after(error)
                    self._loaded = False
                    self._pending_holds.clear()  # the source moved: its next holder recounts
                else:
                    await self._save_after_failure(error)
                raise
            return self._count

    async def _run_processor(self) -> None:
        processor = self.processor
        if isinstance(processor, TransactionalEventProcessor):
            await self._consume_transactional(processor)
        elif isinstance(processor, AutoCommitEventIteratorProcessor):
            await self._consume_auto_commit(processor)
        elif isinstance(processor, ManagedEventIteratorProcessor):
            await self._consume_managed(processor)
        elif isinstance(processor, EventProcessor):
            own_pages = type(processor).around_page is not EventProcessor.around_page
            await self._consume_each(
                processor.process_event, processor.around_page, batched=not own_pages
            )
        else:
            await self._consume_each(processor, _no_context, batched=True)

    async def _pages(self, *, batched: bool) -> AsyncGenerator[list[StoredEvent]]:
        """The events after the processed place, page by page, until a page is not full
        or the pass halts (``EventSource.pages``: the next page is read while one is
        processed, so a drain waits for reads and checkpoint saves side by side).
        ``batched``: each page read from PostgreSQL storage in lists of at most
        DECODE_BATCH events, turned into events only as they are asked for, so that
        decoding the next batch fits inside the wait for the checkpoint save in flight
        (pages already decoded, in memory or through a shared tail, come whole);
        processors with their own ``around_page`` get whole pages."""
        pages = self.source.pages(after=self._processed, batch=DECODE_BATCH if batched else None)
        async with aclosing(pages):
            async for page in pages:
                if self._halted():
                    return
                if page:  # a source drained at a page's end ends with an empty one
                    yield page

    async def _consume_each(
        self,
        process: ProcessEventFunction,
        around_page: Callable[[Sequence[StoredEvent]], AbstractContextManager[None]],
        *,
        batched: bool,
    ) -> None:
        async with aclosing(self._pages(batched=batched)) as pages:
            async for page in pages:
                with around_page(page):
                    if not await self._consume_page(page, process):
                        return

    async def _consume_page(self, page: list[StoredEvent], process: ProcessEventFunction) -> bool:
        """Process ``page`` one event at a time; False when the pass must end.

        The drain's hot path: the halt check, the processed place and the save due are
        inline (``_halted``, ``_mark``), not calls per event, which cost about as much
        as the rest of a quick processor's event (in memory: 490 -> 250 ns an event)."""
        policy = self.failure_policy
        every = self.settings.checkpoint_every
        by_position = isinstance(self.source.identifier, StreamIdentifier)
        for event in page:
            # The lease is read each time: a subscriber may be given one mid-pass.
            if self._stop or ((lease := self.lease) is not None and not lease.is_valid()):
                return False
            if policy is None:
                try:
                    await process(event)
                except Exception:
                    self._event_failed()
                    raise
            elif event.stream in self._parked_names and self._held(event):
                pass  # counted at the end of the pass
            else:
                try:
                    await process(event)
                except Exception as error:
                    if _is_storage_failure(error):
                        raise
                    if not await self._settle(event, error, checkpoint=None):
                        return False
                else:
                    if self._failing is not None:
                        await self._passed(self.source.place(event))
            place = event.position if by_position else event.sequence_number
            processed = self._processed
            if processed is None or place > processed:  # as _acknowledge
                self._processed = place
                self._unsaved += 1
                self._count += 1
            if self._unsaved >= every:
                await self._save_behind()
        return True

    async def _consume_auto_commit(self, processor: AutoCommitEventIteratorProcessor) -> None:
        """Feed the source to ``processor``; with a failure policy, a raise blames the
        event pulled last (the only one not yet counted processed), and once that one
        is parked or skipped the processor is given the rest in a new iterator."""
        while True:
            last_pulled: list[StoredEvent] = []
            try:
                async with aclosing(self._auto_commit_events(last_pulled)) as events:
                    await processor.process(events)
            except Exception as error:
                if self.failure_policy is None or _is_storage_failure(error) or not last_pulled:
                    raise
                if not await self._settle(last_pulled[0], error, checkpoint=None):
                    return
                await self._mark(last_pulled[0])
                continue
            if last_pulled:
                await self._passed(self.source.place(last_pulled[0]))
                await self._mark(last_pulled[0])
            return

    async def _auto_commit_events(
        self, last_pulled: list[StoredEvent]
    ) -> AsyncGenerator[StoredEvent]:
        async with aclosing(self._pages(batched=True)) as pages:
            async for page in pages:
                for event in page:
                    if last_pulled:
                        pulled = last_pulled.pop()
                        if self._failing is not None:
                            await self._passed(self.source.place(pulled))
                        await self._mark(pulled)
                    if self._halted():
                        return
                    if event.stream in self._parked_names and self._held(event):
                        await self._mark(event)
                        continue
                    last_pulled.append(event)
                    yield event

    async def _consume_managed(self, processor: ManagedEventIteratorProcessor) -> None:
        """Feed the source to ``processor``; with a failure policy, a raise with one
        pulled event unacknowledged blames that one; with several, the consumer narrows
        down: it gives them to the processor one per ``process`` call (each counts as
        handled when the call returns) until the failing one is parked or skipped."""
        while not self._halted():
            if self._narrow_until is not None:
                if not await self._narrow_managed(self._narrow_until):
                    return
                continue
            progress = _Progress(self)
            try:
                async with aclosing(self._pulled_events(progress)) as events:
                    await processor.process(events, progress)
            except Exception as error:
                await self._passed(self._processed)
                unacknowledged = list(progress.events)
                if self.failure_policy is None or _is_storage_failure(error) or not unacknowledged:
                    raise
                if len(unacknowledged) > 1:
                    self._narrow_until = self.source.place(unacknowledged[-1])
                    continue
                if not await self._settle(unacknowledged[0], error, checkpoint=None):
                    return
                await self._mark(unacknowledged[0])
                continue
            await self._passed(self._processed)
            return

    async def _narrow_managed(self, until: int) -> bool:
        """Process the next event alone (narrowing down a failure up to ``until``);
        False when the pass must end (nothing left, or it waits for another try)."""
        batch = await self.source.read(after=self._processed, limit=1)
        if not batch:
            self._narrow_until = None
            return False
        event = batch[0]
        if not (event.stream in self._parked_names and self._held(event)):
            try:
                await self._process_alone(event)
            except Exception as error:
                if _is_storage_failure(error):
                    raise
                if not await self._settle(event, error, checkpoint=None):
                    return False
            else:
                await self._passed(self.source.place(event))
        await self._mark(event)
        if self.source.place(event) >= until:
            self._narrow_until = None
        return True

    def _after_processed(self, event: StoredEvent) -> bool:
        return self._processed is None or self.source.place(event) > self._processed

    async def _pulled_events(self, progress: _Progress) -> AsyncGenerator[StoredEvent]:
        async with aclosing(self._pages(batched=True)) as pages:
            async for page in pages:
                for event in page:
                    if self._halted():
                        return
                    place = self.source.place(event)
                    if event.stream in self._parked_names and self._held(event):
                        if progress.pulled == self._processed:  # all pulled acknowledged
                            self._acknowledge(place)
                        progress.pulled = place
                        continue
                    progress.pulled = place
                    progress.events.append(event)
                    yield event

    async def _process_alone(self, event: StoredEvent) -> None:
        """Give ``event`` alone to an iterator processor; it counts as handled when
        ``process`` returns. Raises what the processor raises."""
        processor = self.processor
        if isinstance(processor, AutoCommitEventIteratorProcessor):
            await processor.process(_alone(event))
        else:
            assert isinstance(processor, ManagedEventIteratorProcessor)
            await processor.process(_alone(event), _AloneProgress(event))

    async def _consume_transactional(self, processor: TransactionalEventProcessor) -> None:
        while not self._halted():
            known = self.state_store.known
            reset = known is not None and known.reset_pending
            every = 1 if self._narrow_until is not None else self.settings.checkpoint_every
            batch = await self.source.read(after=self._processed, limit=every)
            if not batch and not reset:
                return
            place = self.source.place(batch[-1]) if batch else self._processed
            names = self._parked_names
            held = [e for e in batch if e.stream in names and self._held(e)] if names else []
            work = [e for e in batch if e not in held] if held else batch
            try:
                async with self.state_store.transaction(bound=self._bound()) as transaction:
                    if reset:
                        await processor.on_reset(
                            self.source.identifier, self._processed, transaction
                        )
                    if held:
                        await self._save_holds(transaction)
                    if work:
                        await processor.process_events(work, transaction)
                    await self.state_store.save(place, transaction=transaction)
            except Exception as error:
                self._pending_holds.clear()  # rolled back: counted again when re-read
                if self.failure_policy is None and work and not _is_storage_failure(error):
                    self._event_failed()
                if self.failure_policy is None or _is_storage_failure(error) or not batch:
                    raise
                if reset:  # the reset hook alone first; then find the failing event
                    async with self.state_store.transaction(bound=self._bound()) as transaction:
                        await processor.on_reset(
                            self.source.identifier, self._processed, transaction
                        )
                        await self.state_store.save(self._processed, transaction=transaction)
                    self._narrow_until = place
                    continue
                if len(batch) > 1:  # find the failing event: one per transaction
                    self._narrow_until = place
                    continue
                if not await self._settle(batch[0], error, checkpoint=place):
                    return
            else:
                await self._passed(place)
            self._processed = place
            self._unsaved = 0
            self._count += len(batch)
            narrow_until = self._narrow_until
            if narrow_until is not None and place is not None and place >= narrow_until:
                self._narrow_until = None
            elif len(batch) < every:
                return

    # --- failures (with a failure policy) ------------------------------------------

    async def _learn_parked(self, parked: Sequence[ParkedStream] | None) -> None:
        """Take this pass's parked records (read them if not given); a stream parked
        before this consumer saw it has its held events recounted once."""
        if parked is None:
            state = self.state_store
            parked = await self.source.backend.parked.list(group=state.group, source=state.source)
        known = self._parked
        self._parked = {(r.stream.category, r.stream.stream): r for r in parked if not r.retrying}
        self._parked_names = frozenset(stream for _, stream in self._parked)
        store = self.source.backend.parked
        for key, record in self._parked.items():
            if key not in known and key not in self._recounted and record.request is None:
                self._recounted.add(key)
                places = [self.source.place(e) for e in await self._held_events(record)]
                # Not reached yet (a holder died before saving its checkpoint): the first
                # event is held all the same, as when it was parked.
                held, last = (len(places), places[-1]) if places else (1, self._first_place(record))
                if (held, last) != (record.held, record.last_held):
                    await store.park(replace(record, held=held, last_held=last), epoch=self._epoch)
        for record in parked:
            if record.retrying:
                await self._resume_tries(record)

    def _first_place(self, record: ParkedStream) -> int:
        """The place in the source of the record's first event."""
        by_position = isinstance(self.source.identifier, StreamIdentifier)
        return record.position if by_position else record.sequence_number

    async def _resume_tries(self, record: ParkedStream) -> None:
        """Go on counting the stored tries of an event (a previous holder's): it is
        tried again at once. A record of an event already passed is deleted."""
        assert self.failure_policy is not None
        place = self._first_place(record)
        failing = self._failing
        if self._processed is not None and place <= self._processed:
            await self.source.backend.parked.remove(
                record.group, record.source, record.stream, epoch=self._epoch
            )
        elif failing is None:
            self._failing = _Failing(
                place,
                record.stream,
                record.attempts,
                record.first_failed_at,
                self.failure_policy.clock(),
                stored=True,
            )
        elif failing.place == place:
            failing.stored = True

    def _held(self, event: StoredEvent) -> bool:
        """Whether ``event`` belongs to a parked stream (held instead of given to the
        processor); if so, note it to be counted at the end of the pass."""
        key = (event.category, event.stream)
        if key not in self._parked:
            return False
        self._pending_holds.setdefault(key, []).append(self.source.place(event))
        return True

    async def _save_holds(self, transaction: ConsumerTransaction | None) -> None:
        """Count the noted held events in their records: one statement per stream."""
        pending, self._pending_holds = self._pending_holds, {}
        state = self.state_store
        for (category, stream), places in pending.items():
            await self.source.backend.parked.hold(
                state.group,
                state.source,
                StreamIdentifier(category, stream),
                places,
                transaction=transaction,
                epoch=self._epoch,
            )

    def _attempt_failed(self, event: StoredEvent, error: Exception) -> _Failing | None:
        """Count a failed try of ``event``; return its failure record once the tries
        are used up, None when it waits for another try (logged, wake-up scheduled).
        Raises ProcessorFailedError when the policy stops the group or the node."""
        policy = self.failure_policy
        assert policy is not None
        place = self.source.place(event)
        failing = self._failing
        if failing is None or failing.place != place:
            stream = StreamIdentifier(event.category, event.stream)
            failing = _Failing(place, stream, 0, datetime.now(UTC), 0.0)
        failing.attempts += 1
        self._event_failed()
        described = where(self.state_store.group, self.source.identifier, event)
        logger.debug("%s: the processor raised", described, exc_info=error)
        if failing.attempts < policy.max_attempts:
            delay = policy.delay(failing.attempts)
            failing.retry_at = policy.clock() + delay
            self._failing = failing
            logger.warning(
                "%s: try %d of %d failed (%s); trying again in %.3g s",
                described,
                failing.attempts,
                policy.max_attempts,
                one_line(error),
                delay,
            )
            self._schedule_retry(delay)
            return None
        self._failing = None
        action = policy.then
        if action in (FailureAction.STOP_GROUP, FailureAction.STOP_NODE):
            stops_node = action is FailureAction.STOP_NODE
            message = (
                f"{described}: failed {failing.attempts} times ({one_line(error)}); "
                f"stopping the {'node' if stops_node else 'group on this node'}"
            )
            logger.error("%s", message)
            raise ProcessorFailedError(message, stops_node=stops_node) from error
        logger.error(
            "%s: failed %d times (%s); %s",
            described,
            failing.attempts,
            one_line(error),
            "parked the stream: it and its later events are held"
            if action is FailureAction.PARK
            else "skipped the event",
        )
        return failing

    async def _passed(self, place: int | None) -> None:
        """The events up to ``place`` were processed: if the one being retried is among
        them, it is no longer, and its stored tries are deleted."""
        failing = self._failing
        if failing is None or place is None or place < failing.place:
            return
        self._failing = None
        if failing.stored:
            store = self.source.backend.parked
            await store.remove(self._group, self._source, failing.stream, epoch=self._epoch)

    def _event_failed(self) -> None:
        if self.on_event_failed is not None:
            self.on_event_failed()

    def _schedule_retry(self, delay: float) -> None:
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        self._retry_timer = asyncio.get_running_loop().call_later(delay, self._retry_due)

    def _retry_due(self) -> None:
        self._retry_timer = None
        if self.on_retry_due is not None and not self._stop:
            self.on_retry_due()

    def _parked_record(
        self, event: StoredEvent, error: Exception, failing: _Failing
    ) -> ParkedStream:
        text = "".join(traceback.format_exception(error))
        return ParkedStream(
            group=self.state_store.group,
            source=self.source.identifier,
            stream=StreamIdentifier(event.category, event.stream),
            sequence_number=event.sequence_number,
            position=event.position,
            event_name=event.name,
            held=1,
            last_held=self.source.place(event),
            error_type=type(error).__name__,
            error_message=str(error)[:_TRACEBACK_LIMIT],
            traceback=text[-_TRACEBACK_LIMIT:],
            attempts=failing.attempts,
            first_failed_at=failing.first_failed_at,
            last_failed_at=datetime.now(UTC),
        )

    def _skipped(self, event: StoredEvent, error: Exception | None) -> SkippedEvent:
        return SkippedEvent(
            group=self.state_store.group,
            source=self.source.identifier,
            stream=StreamIdentifier(event.category, event.stream),
            sequence_number=event.sequence_number,
            position=event.position,
            event_name=event.name,
            reason="operator" if error is None else "policy",
            error_type="" if error is None else type(error).__name__,
            error_message="" if error is None else str(error)[:_TRACEBACK_LIMIT],
            skipped_at=datetime.now(UTC),
        )

    async def _settle(
        self, event: StoredEvent, error: Exception, *, checkpoint: int | None
    ) -> bool:
        """After ``event`` failed in the normal flow: False when it waits for another
        try (the pass ends); True once it is parked or skipped (the caller moves past
        it). With ``checkpoint`` (transactional), the record and that checkpoint
        commit together."""
        failing = self._attempt_failed(event, error)
        store = self.source.backend.parked
        if failing is None:
            waiting = self._failing
            assert waiting is not None
            tries = replace(self._parked_record(event, error, waiting), held=0)
            await store.park(tries, epoch=self._epoch)
            waiting.stored = True
            return False
        parking = self.failure_policy is not None and self.failure_policy.then is FailureAction.PARK
        record = self._parked_record(event, error, failing) if parking else None
        stream = failing.stream
        if checkpoint is None:
            if record is not None:
                await store.park(record, epoch=self._epoch)
            else:
                await store.record_skipped(self._skipped(event, error), epoch=self._epoch)
                if failing.stored:
                    await store.remove(self._group, self._source, stream, epoch=self._epoch)
        else:
            async with self.state_store.transaction(bound=self._bound()) as transaction:
                if record is not None:
                    await store.park(record, transaction=transaction, epoch=self._epoch)
                else:
                    await store.record_skipped(
                        self._skipped(event, error), transaction=transaction, epoch=self._epoch
                    )
                    if failing.stored:
                        await store.remove(
                            self._group,
                            self._source,
                            stream,
                            transaction=transaction,
                            epoch=self._epoch,
                        )
                await self.state_store.save(checkpoint, transaction=transaction)
        if record is not None:
            self._parked[_stream_key(event)] = record
            self._parked_names = self._parked_names | {event.stream}
        return True

    async def _serve_requests(self) -> bool:
        """Carry out operators' requests on parked streams; False when the pass must
        end (an event waits for another try)."""
        for record in list(self._parked.values()):
            if record.request is None:
                continue
            if not await self._replay(record):
                return False
        return True

    async def _held_events(self, record: ParkedStream) -> list[StoredEvent]:
        """The events of the parked stream from its first held one up to the place this
        consumer has passed, in order."""
        reader = EventSource(self.source.backend, record.stream, page_size=self.source.page_size)
        found: list[StoredEvent] = []
        after = record.position - 1 if record.position > 0 else None
        while True:
            page = await reader.read(after=after)
            for event in page:
                if self._processed is None or self.source.place(event) > self._processed:
                    return found
                found.append(event)
            if len(page) < reader.page_size:
                return found
            after = page[-1].position

    async def _replay(self, record: ParkedStream) -> bool:
        """Replay (or skip, as requested) the held events of ``record`` in order; False
        when one waits for another try. A failure after the last try parks the stream
        again at that event (request cleared) or skips it, as the policy says."""
        key = (record.stream.category, record.stream.stream)
        held = await self._held_events(record)
        skip = record.request is ParkedRequest.SKIP
        for index, event in enumerate(held):
            following = held[index + 1] if index + 1 < len(held) else None
            if skip and (
                record.skip_through is None or event.sequence_number <= record.skip_through
            ):
                logger.warning(
                    "%s: skipped by request",
                    where(record.group, record.source, event),
                )
                async with self.state_store.transaction(bound=self._bound()) as transaction:
                    await self.source.backend.parked.record_skipped(
                        self._skipped(event, None), transaction=transaction, epoch=self._epoch
                    )
                    record = await self._advance(
                        record, following, len(held) - index - 1, transaction
                    )
                continue
            try:
                record = await self._replay_one(record, event, following, len(held) - index - 1)
            except Exception as error:
                if _is_storage_failure(error):
                    raise
                failing = self._attempt_failed(event, error)
                if failing is None:
                    return False
                assert self.failure_policy is not None
                if self.failure_policy.then is FailureAction.PARK:
                    acted_on = record.request
                    fresh = self._parked_record(event, error, failing)
                    record = replace(
                        fresh,
                        held=len(held) - index,
                        last_held=max(record.last_held, fresh.last_held),
                    )
                    store = self.source.backend.parked
                    await store.park(record, epoch=self._epoch)
                    if acted_on is not None:  # unless an operator asked again meanwhile
                        await store.clear_request(
                            record.group, record.source, record.stream, acted_on, epoch=self._epoch
                        )
                    self._parked[key] = record
                    return True
                async with self.state_store.transaction(bound=self._bound()) as transaction:
                    await self.source.backend.parked.record_skipped(
                        self._skipped(event, error), transaction=transaction, epoch=self._epoch
                    )
                    record = await self._advance(
                        record, following, len(held) - index - 1, transaction
                    )
            else:
                self._failing = None
            self._count += 1
        if key in self._parked:  # nothing was held (any more): the stream flows again
            await self.source.backend.parked.remove(
                record.group, record.source, record.stream, epoch=self._epoch
            )
            del self._parked[key]
        return True

    async def _replay_one(
        self, record: ParkedStream, event: StoredEvent, following: StoredEvent | None, left: int
    ) -> ParkedStream:
        """Process one held event and move the record past it (together, with a
        transactional processor); return the record as it now is."""
        processor = self.processor
        if isinstance(processor, TransactionalEventProcessor):
            async with self.state_store.transaction(bound=self._bound()) as transaction:
                await processor.process_events([event], transaction)
                return await self._advance(record, following, left, transaction)
        if isinstance(processor, EventProcessor):
            with processor.around_page([event]):
                await processor.process_event(event)
        elif isinstance(
            processor, AutoCommitEventIteratorProcessor | ManagedEventIteratorProcessor
        ):
            await self._process_alone(event)
        else:
            await processor(event)
        return await self._advance(record, following, left, None)

    async def _advance(
        self,
        record: ParkedStream,
        following: StoredEvent | None,
        left: int,
        transaction: ConsumerTransaction | None,
    ) -> ParkedStream:
        """Move the record's first held event to ``following``, or remove the record
        when none is left (the stream flows again)."""
        store = self.source.backend.parked
        key = (record.stream.category, record.stream.stream)
        if following is None:
            await store.remove(
                record.group,
                record.source,
                record.stream,
                transaction=transaction,
                epoch=self._epoch,
            )
            self._parked.pop(key, None)
            return record
        moved = replace(
            record,
            sequence_number=following.sequence_number,
            position=following.position,
            event_name=following.name,
            held=left,
        )
        await store.park(moved, transaction=transaction, epoch=self._epoch)
        self._parked[key] = moved
        return moved

    async def _mark(self, event: StoredEvent) -> None:
        """Record ``event`` processed; once ``checkpoint_every`` are unsaved, start saving
        in the background (``_save_behind``)."""
        self._acknowledge(self.source.place(event))
        if self._unsaved >= self.settings.checkpoint_every:
            await self._save_behind()

    def _acknowledge(self, place: int) -> None:
        if self._processed is None or place > self._processed:
            self._processed = place
            self._unsaved += 1
            self._count += 1

    async def _save_if_due(self, *, force: bool) -> None:
        if self._unsaved >= self.settings.checkpoint_every or (force and self._unsaved):
            await self._save()

    async def _save(self) -> None:
        """Save the processed place now (after the save in flight, if any)."""
        await self._saved()
        await self.state_store.save(self._processed)
        self._unsaved = 0

    async def _save_behind(self) -> None:
        """Save the processed place while the next events are processed.

        A synchronous save per ``checkpoint_every`` events made a drain on PostgreSQL
        wait for a commit (a WAL flush) each time, most of its time with a quick
        processor. So the save of batch k commits while batch k+1 is processed. The
        saved place is one already processed (a checkpoint is never ahead of the
        processor), saves stay one at a time and in order (the previous one is waited
        for here, and raises here if it failed), and every pass ends only after its
        last save ended. The cost: a crash may deliver again the batch whose save was
        in flight as well as the one being processed, at most twice
        ``checkpoint_every`` events. Transactional processors do not use this: their
        checkpoint commits with their batch.
        """
        await self._saved()
        place, count = self._processed, self._unsaved
        self._saving = asyncio.create_task(self.state_store.save(place))
        self._saving_count = count
        self._unsaved = 0
        # A task runs only once this coroutine suspends, and processing a batch with a
        # quick processor never does: without this yield the save's UPDATE was only
        # sent when the next save waited for it, so commits and processing did not
        # overlap at all (measured: the drain took the read plus the commits). One
        # yield lets the task borrow a connection and send the statement.
        await asyncio.sleep(0)

    async def _saved(self) -> None:
        """Wait for the save in flight, if any; if it failed, its events count as
        unsaved again and its error is raised (ConflictError, StorageError)."""
        saving, self._saving = self._saving, None
        if saving is None:
            return
        try:
            await saving
        except BaseException:
            self._unsaved += self._saving_count
            raise

    async def _end_saving_after(self, error: BaseException) -> None:
        """Wait for the save in flight; its failure becomes a note on ``error``."""
        try:
            await self._saved()
        except Exception as save_error:
            error.add_note(f"eventmill: the checkpoint could not be saved: {save_error!r}")
            self._loaded = False

    async def _save_after_failure(self, error: BaseException) -> None:
        await self._end_saving_after(error)
        try:
            if self._pending_holds:
                await self._save_holds(None)
        except Exception as save_error:
            error.add_note(f"eventmill: held events could not be counted: {save_error!r}")
        if not self._unsaved or not self._loaded:  # not loaded: the save in flight failed
            return
        try:
            await self._save()
        except Exception as save_error:
            error.add_note(f"eventmill: the checkpoint could not be saved: {save_error!r}")
            self._loaded = False

    def __repr__(self) -> str:
        return f"<EventSourceConsumer {self.source.identifier} processed={self._processed}>"


class _Progress(ConsumerProgress):
    """The progress handle of a managed processor: acknowledges move the consumer's
    processed place; commits save it."""

    def __init__(self, consumer: EventSourceConsumer) -> None:
        self._consumer = consumer
        self.pulled: int | None = consumer.processed
        self.events: deque[StoredEvent] = deque()
        """The events given to the processor in this call and not acknowledged yet."""

    def acknowledge(self, events: StoredEvent | Sequence[StoredEvent]) -> None:
        consumer = self._consumer
        for event in [events] if isinstance(events, StoredEvent) else events:
            place = consumer.source.place(event)
            if self.pulled is None or place > self.pulled:
                raise InvalidInputError(f"acknowledged an event not pulled yet: {event.id}")
            consumer._acknowledge(place)
        while self.events and not consumer._after_processed(self.events[0]):
            self.events.popleft()

    async def commit(self, *, force: bool = False) -> None:
        await self._consumer._save_if_due(force=force)


async def _alone(event: StoredEvent) -> AsyncGenerator[StoredEvent]:
    yield event


class _AloneProgress(ConsumerProgress):
    """The progress handle of a managed processor given one event alone: the consumer
    counts the event handled when ``process`` returns, so this only checks."""

    def __init__(self, event: StoredEvent) -> None:
        self._event = event

    def acknowledge(self, events: StoredEvent | Sequence[StoredEvent]) -> None:
        for event in [events] if isinstance(events, StoredEvent) else events:
            if event != self._event:
                raise InvalidInputError(f"acknowledged an event not pulled yet: {event.id}")

    async def commit(self, *, force: bool = False) -> None:
        return None

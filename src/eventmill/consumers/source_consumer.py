"""EventSourceConsumer: feeds one source to one processor and keeps its checkpoint.

A pass (``consume_all``) resumes after the stored checkpoint, reads page by page until
the source is drained, and saves the checkpoint every ``checkpoint_every`` processed
events and at the end of the pass. So after a crash at most ``checkpoint_every``
events are delivered again (at-least-once); with a ``TransactionalEventProcessor`` on
PostgreSQL none are (exactly-once). When the processor raises, the checkpoint of the
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
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

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
from eventmill.errors import ConflictError, InvalidInputError, InvalidSettingsError, describe
from eventmill.events import StoredEvent
from eventmill.sources import EventSource


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


class EventSourceConsumer:
    """Feeds ``source`` to ``processor``, checkpointing through ``state_store``; with a
    ``lease``, only while the lease is valid (see the module docstring)."""

    def __init__(
        self,
        source: EventSource,
        processor: Processor,
        state_store: EventConsumerStateStore,
        *,
        settings: ConsumerSettings | None = None,
        lease: OwnershipLease | None = None,
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

    @property
    def processed(self) -> int | None:
        """The place of the last processed event (None before the first)."""
        return self._processed

    def stop(self) -> None:
        """End the running pass (if any) at the next event boundary, saving first, and
        every later pass at once. Never blocks; see ``wait_pass_finished``."""
        self._stop = True

    def _halted(self) -> bool:
        """Whether the pass must end before the next event: stopped, or lease expired."""
        return self._stop or (self.lease is not None and not self.lease.is_valid())

    async def wait_pass_finished(self) -> None:
        """Return once no pass is running (its checkpoint saved or its error raised)."""
        async with self._pass_lock:
            pass

    async def consume_all(self) -> int:
        """One pass: process every event after the checkpoint; return how many.

        Ends early (after saving) when stopped or when the lease expires. Raises what
        the processor raised (after saving the progress before it),
        ConflictError or StaleEpochError when the checkpoint moved under us (the next
        pass resumes from what is stored), StorageError.
        """
        async with self._pass_lock:
            if self._stop:
                return 0
            if not self._loaded:
                self._processed = await self.state_store.load()
                self._unsaved = 0
                self._loaded = True
            self._count = 0
            try:
                await self._run_processor()
                if self._unsaved and (self.settings.checkpoint_at_end or self._stop):
                    await self._save()
            except BaseException as error:
                if isinstance(error, ConflictError):
                    self._loaded = False
                else:
                    await self._save_after_failure(error)
                raise
            return self._count

    async def _run_processor(self) -> None:
        processor = self.processor
        if isinstance(processor, TransactionalEventProcessor):
            await self._consume_transactional(processor)
        elif isinstance(processor, AutoCommitEventIteratorProcessor):
            last_pulled: list[StoredEvent] = []
            async with aclosing(self._auto_commit_events(last_pulled)) as events:
                await processor.process(events)
            if last_pulled:
                await self._mark(last_pulled[0])
        elif isinstance(processor, ManagedEventIteratorProcessor):
            progress = _Progress(self)
            async with aclosing(self._pulled_events(progress)) as events:
                await processor.process(events, progress)
        elif isinstance(processor, EventProcessor):
            await self._consume_each(processor.process_event)
        else:
            await self._consume_each(processor)

    async def _pages(self) -> AsyncGenerator[list[StoredEvent]]:
        after = self._processed
        page_size = self.source.page_size
        while not self._halted():
            page = await self.source.read(after=after)
            if page:
                yield page
                after = self.source.place(page[-1])
            if len(page) < page_size:
                return

    async def _consume_each(self, process: ProcessEventFunction) -> None:
        async with aclosing(self._pages()) as pages:
            async for page in pages:
                for event in page:
                    if self._halted():
                        return
                    await process(event)
                    await self._mark(event)

    async def _auto_commit_events(
        self, last_pulled: list[StoredEvent]
    ) -> AsyncGenerator[StoredEvent]:
        async with aclosing(self._pages()) as pages:
            async for page in pages:
                for event in page:
                    if last_pulled:
                        await self._mark(last_pulled.pop())
                    if self._halted():
                        return
                    last_pulled.append(event)
                    yield event

    async def _pulled_events(self, progress: _Progress) -> AsyncGenerator[StoredEvent]:
        async with aclosing(self._pages()) as pages:
            async for page in pages:
                for event in page:
                    if self._halted():
                        return
                    progress.pulled = self.source.place(event)
                    yield event

    async def _consume_transactional(self, processor: TransactionalEventProcessor) -> None:
        every = self.settings.checkpoint_every
        while not self._halted():
            known = self.state_store.known
            reset = known is not None and known.reset_pending
            batch = await self.source.read(after=self._processed, limit=every)
            if not batch and not reset:
                return
            place = self.source.place(batch[-1]) if batch else self._processed
            async with self.state_store.transaction() as transaction:
                if reset:
                    await processor.on_reset(self.source.identifier, self._processed, transaction)
                if batch:
                    await processor.process_events(batch, transaction)
                await self.state_store.save(place, transaction=transaction)
            self._processed = place
            self._unsaved = 0
            self._count += len(batch)
            if len(batch) < every:
                return

    async def _mark(self, event: StoredEvent) -> None:
        """Record ``event`` processed; save when ``checkpoint_every`` are unsaved."""
        self._acknowledge(self.source.place(event))
        await self._save_if_due(force=False)

    def _acknowledge(self, place: int) -> None:
        if self._processed is None or place > self._processed:
            self._processed = place
            self._unsaved += 1
            self._count += 1

    async def _save_if_due(self, *, force: bool) -> None:
        if self._unsaved >= self.settings.checkpoint_every or (force and self._unsaved):
            await self._save()

    async def _save(self) -> None:
        await self.state_store.save(self._processed)
        self._unsaved = 0

    async def _save_after_failure(self, error: BaseException) -> None:
        if not self._unsaved:
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
        self.pulled: int | None = None

    def acknowledge(self, events: StoredEvent | Sequence[StoredEvent]) -> None:
        consumer = self._consumer
        for event in [events] if isinstance(events, StoredEvent) else events:
            place = consumer.source.place(event)
            if self.pulled is None or place > self.pulled:
                raise InvalidInputError(f"acknowledged an event not pulled yet: {event.id}")
            consumer._acknowledge(place)

    async def commit(self, *, force: bool = False) -> None:
        await self._consumer._save_if_due(force=force)

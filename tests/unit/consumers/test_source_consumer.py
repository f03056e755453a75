"""EventSourceConsumer with every processor kind: resume, replay window, failures,
stop; and EventConsumerStateStore refreshing after a lost save."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import timedelta

import pytest

from eventmill import CategoryIdentifier, ConflictError, NewEvent, StorageError
from eventmill.backends.base import Checkpoint
from eventmill.backends.memory import (
    InMemoryBackend,
    InMemoryCheckpointStorage,
    InMemoryConsumerTransaction,
)
from eventmill.consumers import (
    ConsumerSettings,
    EventConsumerStateStore,
    EventProcessor,
    EventSourceConsumer,
)
from eventmill.consumers.source_consumer import DECODE_BATCH
from eventmill.errors import InvalidInputError, InvalidSettingsError
from eventmill.events import EventSourceIdentifier, StoredEvent
from eventmill.sources import EventSource
from eventmill.store import EventStore
from tests.unit.consumers.harness import KINDS, Boom, Recorder, processor_of

ORDERS = CategoryIdentifier("orders")


async def publish(backend: InMemoryBackend, count: int, category: str = "orders") -> None:
    stream = EventStore(backend).stream(category=category, stream="s")
    for number in range(count):
        await stream.publish([NewEvent(name="happened", payload={"n": number})])


def consumer(
    backend: InMemoryBackend,
    kind: str,
    recorder: Recorder,
    *,
    every: int = 10,
    checkpoints: InMemoryCheckpointStorage | None = None,
    page_size: int = 7,
    shared_tail: bool = False,
) -> EventSourceConsumer:
    state = EventConsumerStateStore(checkpoints or backend.checkpoints, "g", ORDERS)
    return EventSourceConsumer(
        EventSource(backend, ORDERS, page_size=page_size, shared_tail=shared_tail),
        processor_of(kind, recorder),
        state,
        settings=ConsumerSettings(checkpoint_every=every),
    )


async def stored_after(backend: InMemoryBackend) -> int | None:
    checkpoint = await backend.checkpoints.get("g", ORDERS)
    return None if checkpoint is None else checkpoint.after


@pytest.mark.parametrize("kind", KINDS)
async def test_resumes_from_the_checkpoint_after_a_restart(kind: str) -> None:
    backend = InMemoryBackend()
    await publish(backend, 25)
    first = Recorder()
    assert await consumer(backend, kind, first).consume_all() == 25
    assert first.seen == list(range(1, 26))
    assert await stored_after(backend) == 25
    await publish(backend, 12)
    second = Recorder()
    assert await consumer(backend, kind, second).consume_all() == 12
    assert second.seen == list(range(26, 38))


class WrappedCheckpoints(InMemoryCheckpointStorage):
    """Checkpoints that hand everything to ``inner``; subclasses change ``save``."""

    def __init__(self, inner: InMemoryCheckpointStorage) -> None:
        super().__init__()
        self.inner = inner

    async def get(self, group: str, source: EventSourceIdentifier) -> Checkpoint | None:
        return await self.inner.get(group, source)

    async def save(
        self,
        group: str,
        source: EventSourceIdentifier,
        after: int | None,
        *,
        expected_version: int | None,
        epoch: int | None = None,
    ) -> Checkpoint:
        return await self.inner.save(
            group, source, after, expected_version=expected_version, epoch=epoch
        )


class CrashingCheckpoints(WrappedCheckpoints):
    """Checkpoints whose saves fail once ``crashed``: what a dead process leaves."""

    def __init__(self, inner: InMemoryCheckpointStorage) -> None:
        super().__init__(inner)
        self.crashed = False

    async def save(
        self,
        group: str,
        source: EventSourceIdentifier,
        after: int | None,
        *,
        expected_version: int | None,
        epoch: int | None = None,
    ) -> Checkpoint:
        if self.crashed:
            raise StorageError("the process is dead")
        return await super().save(
            group, source, after, expected_version=expected_version, epoch=epoch
        )

    @asynccontextmanager
    async def transaction(
        self, *, bound: timedelta | None = None
    ) -> AsyncIterator[InMemoryConsumerTransaction]:
        async with self.inner.transaction(bound=bound) as transaction:
            yield transaction
            if self.crashed:
                raise StorageError("the process is dead")


@pytest.mark.parametrize("kind", KINDS)
async def test_replay_after_a_crash_is_at_most_twice_the_checkpoint_interval(kind: str) -> None:
    """The save of one batch commits while the next is processed: a crash may replay
    both (20 events here); a transactional processor replays none."""
    backend = InMemoryBackend()
    await publish(backend, 95)
    crashing = CrashingCheckpoints(backend.checkpoints)
    dying = Recorder()

    def crash_at_57(event: StoredEvent) -> None:
        if event.sequence_number == 57:
            crashing.crashed = True

    dying.on_event = crash_at_57
    with pytest.raises(StorageError):
        await consumer(backend, kind, dying, checkpoints=crashing).consume_all()
    survivor = Recorder()
    await consumer(backend, kind, survivor).consume_all()
    assert sorted(set(dying.seen) | set(survivor.seen)) == list(range(1, 96))
    replayed = set(dying.seen) & set(survivor.seen)
    assert 0 < len(replayed) <= 20
    assert survivor.seen == list(range(survivor.seen[0], 96))


class GatedCheckpoints(WrappedCheckpoints):
    """Checkpoints whose saves wait for ``release``, recording what was asked and saved."""

    def __init__(self, inner: InMemoryCheckpointStorage) -> None:
        super().__init__(inner)
        self.release = asyncio.Event()
        self.asked: list[int | None] = []
        self.saved: list[int | None] = []

    async def save(
        self,
        group: str,
        source: EventSourceIdentifier,
        after: int | None,
        *,
        expected_version: int | None,
        epoch: int | None = None,
    ) -> Checkpoint:
        self.asked.append(after)
        await self.release.wait()
        saved = await super().save(
            group, source, after, expected_version=expected_version, epoch=epoch
        )
        self.saved.append(after)
        return saved


@pytest.mark.parametrize("kind", ["each", "function", "auto-commit"])
async def test_the_next_batch_is_processed_while_a_checkpoint_commits(kind: str) -> None:
    backend = InMemoryBackend()
    await publish(backend, 25)
    gated = GatedCheckpoints(backend.checkpoints)
    recorder = Recorder()
    twentieth = asyncio.Event()
    recorder.on_event = lambda event: twentieth.set() if event.sequence_number == 20 else None
    passing = asyncio.create_task(
        consumer(backend, kind, recorder, checkpoints=gated).consume_all()
    )
    try:
        await asyncio.wait_for(twentieth.wait(), 5)
        # The save of the first 10 is under way; the next 10 were processed meanwhile,
        # and the second save waits for the first.
        assert recorder.seen == list(range(1, 21))
        assert gated.asked == [10]
        assert not passing.done()
    finally:
        gated.release.set()
    assert await passing == 25
    assert gated.saved == [10, 20, 25]
    assert await stored_after(backend) == 25


@pytest.mark.parametrize("kind", ["each", "function", "auto-commit"])
async def test_a_save_is_sent_before_the_next_batch_is_processed(kind: str) -> None:
    """With a processor that never suspends and no page boundary in between, the save
    of the first 10 has reached the storage before event 15 is processed: its commit
    overlaps the processing instead of starting when the next save waits for it."""
    backend = InMemoryBackend()
    await publish(backend, 25)
    gated = GatedCheckpoints(backend.checkpoints)
    gated.release.set()
    recorder = Recorder()
    asked_at_15: list[int | None] = []
    recorder.on_event = lambda event: (
        asked_at_15.extend(gated.asked) if event.sequence_number == 15 else None
    )
    assert await consumer(backend, kind, recorder, checkpoints=gated, page_size=50).consume_all()
    assert asked_at_15 == [10]
    assert gated.saved == [10, 20, 25]


@pytest.mark.parametrize("kind", ["each", "function", "auto-commit", "managed"])
async def test_the_next_page_is_asked_for_before_a_full_page_is_processed(kind: str) -> None:
    """Through a shared tail, as subscribers read (a plain source's pages come from
    ``EventStorage.pages``, which PostgreSQL reads ahead)."""
    backend = InMemoryBackend()
    await publish(backend, 12)
    recorder = Recorder()
    tailed = consumer(backend, kind, recorder, page_size=5, shared_tail=True)
    source = tailed.source
    asked: list[int | None] = []
    read = source.read

    async def recording_read(*, after: int | None, limit: int | None = None) -> list[StoredEvent]:
        asked.append(after)
        return await read(after=after, limit=limit)

    source.read = recording_read  # type: ignore[method-assign]
    asked_at_1: list[int | None] = []
    recorder.on_event = lambda event: (
        asked_at_1.extend(asked) if event.sequence_number == 1 else None
    )
    assert await tailed.consume_all() == 12
    assert asked_at_1 == [None, 5]
    assert recorder.seen == list(range(1, 13))


class OwnPages(EventProcessor):
    """A processor with its own ``around_page``, noting the events it is given."""

    def __init__(self) -> None:
        self.pages: list[int] = []

    async def process_event(self, event: StoredEvent) -> None:
        return None

    @contextmanager
    def around_page(self, events: Sequence[StoredEvent]) -> Iterator[None]:
        self.pages.append(len(events))
        yield


@pytest.mark.parametrize("kind", ["each", "function", "auto-commit", "managed", "own pages"])
async def test_pages_come_in_decode_batches_unless_the_processor_has_its_own_around_page(
    kind: str,
) -> None:
    backend = InMemoryBackend()
    await publish(backend, 2 * DECODE_BATCH + 5)
    asked: list[int | None] = []
    pages = backend.events.pages

    def recording_pages(
        source: EventSourceIdentifier, *, after: int | None, limit: int, batch: int | None = None
    ) -> AsyncGenerator[list[StoredEvent], None]:
        asked.append(batch)
        return pages(source, after=after, limit=limit, batch=batch)

    backend.events.pages = recording_pages  # type: ignore[method-assign]
    own = OwnPages()
    recorder = Recorder()
    draining = EventSourceConsumer(
        EventSource(backend, ORDERS, page_size=3 * DECODE_BATCH),
        own if kind == "own pages" else processor_of(kind, recorder),
        EventConsumerStateStore(backend.checkpoints, "g", ORDERS),
    )
    assert await draining.consume_all() == 2 * DECODE_BATCH + 5
    if kind == "own pages":
        assert asked == [None] and own.pages == [2 * DECODE_BATCH + 5]
    else:
        assert asked == [DECODE_BATCH]
        assert recorder.seen == list(range(1, 2 * DECODE_BATCH + 6))


@pytest.mark.parametrize("kind", KINDS)
async def test_a_failure_keeps_the_events_before_it_checkpointed(kind: str) -> None:
    backend = InMemoryBackend()
    await publish(backend, 50)
    failing = Recorder(fail_at=37)
    with pytest.raises(Boom):
        await consumer(backend, kind, failing).consume_all()
    assert failing.seen == list(range(1, 37))
    expected = 30 if kind == "transactional" else 36  # a transactional batch is atomic
    assert await stored_after(backend) == expected
    healed = Recorder()
    assert await consumer(backend, kind, healed).consume_all() == 50 - expected
    assert healed.seen == list(range(expected + 1, 51))


@pytest.mark.parametrize("kind", KINDS)
async def test_checkpoint_every_event_and_none_at_the_end(kind: str) -> None:
    backend = InMemoryBackend()
    await publish(backend, 5)
    recorder = Recorder()
    state = EventConsumerStateStore(backend.checkpoints, "g", ORDERS)
    eager = EventSourceConsumer(
        EventSource(backend, ORDERS),
        processor_of(kind, recorder),
        state,
        settings=ConsumerSettings(checkpoint_every=1, checkpoint_at_end=False),
    )
    assert await eager.consume_all() == 5
    assert state.known is not None and state.known.version == 5
    lazy_recorder = Recorder()
    await publish(backend, 3)
    lazy = consumer(backend, kind, lazy_recorder, every=100)
    lazy.settings = ConsumerSettings(checkpoint_every=100, checkpoint_at_end=False)
    assert await lazy.consume_all() == 3
    expected = 8 if kind == "transactional" else 5  # a transactional batch always saves
    assert await stored_after(backend) == expected


async def test_a_lost_save_refreshes_the_state_and_the_next_pass_goes_on() -> None:
    backend = InMemoryBackend()
    await publish(backend, 20)
    ours = consumer(backend, "each", Recorder(), every=5)
    assert await ours.consume_all() == 20
    other = EventConsumerStateStore(backend.checkpoints, "g", ORDERS)
    await other.load()
    await other.save(12)  # someone else moves the checkpoint back
    await publish(backend, 3)
    with pytest.raises(ConflictError):
        await ours.consume_all()
    recorder = Recorder()
    ours.processor = processor_of("each", recorder)
    assert await ours.consume_all() == 11
    assert recorder.seen == list(range(13, 24))
    assert await stored_after(backend) == 23


async def test_reset_persists_and_replays_from_the_start() -> None:
    backend = InMemoryBackend()
    await publish(backend, 4)
    assert await consumer(backend, "each", Recorder()).consume_all() == 4
    state = EventConsumerStateStore(backend.checkpoints, "g", ORDERS)
    await state.reset()
    assert await stored_after(backend) is None
    again = Recorder()
    assert await consumer(backend, "each", again).consume_all() == 4
    assert again.seen == [1, 2, 3, 4]


@pytest.mark.parametrize("kind", KINDS)
async def test_stop_ends_the_pass_after_the_current_event_and_saves(kind: str) -> None:
    backend = InMemoryBackend()
    await publish(backend, 30)
    recorder = Recorder(block_at=5)
    stopping = consumer(backend, kind, recorder)
    task = asyncio.create_task(stopping.consume_all())
    await recorder.reached.wait()
    stopping.stop()
    waiter = asyncio.create_task(stopping.wait_pass_finished())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiter.done()
    recorder.release.set()
    await waiter
    finished = 10 if kind == "transactional" else 5
    assert await task == finished
    assert await stored_after(backend) == finished
    assert await stopping.consume_all() == 0


async def test_bad_arguments_are_refused() -> None:
    backend = InMemoryBackend()
    state = EventConsumerStateStore(backend.checkpoints, "g", ORDERS)
    with pytest.raises(InvalidInputError):
        EventSourceConsumer(EventSource(backend, ORDERS), object(), state)  # type: ignore[arg-type]
    with pytest.raises(InvalidSettingsError):
        ConsumerSettings(checkpoint_every=0)
    with pytest.raises(InvalidInputError):
        EventConsumerStateStore(backend.checkpoints, "", ORDERS)

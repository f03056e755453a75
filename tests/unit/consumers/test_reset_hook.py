"""TransactionalEventProcessor.on_reset after a group reset, on the in-memory backend:
it runs once, in the transaction of the first batch after the new place (also when
nothing is left to replay), and a failing hook leaves the reset pending."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from eventmill import CategoryIdentifier, EventStore, NewEvent
from eventmill.backends.base import ConsumerTransaction
from eventmill.backends.memory import InMemoryBackend
from eventmill.consumers import (
    ConsumerSettings,
    EventConsumerStateStore,
    EventSourceConsumer,
    TransactionalEventProcessor,
)
from eventmill.events import EventSourceIdentifier, StoredEvent
from eventmill.sources import EventSource

ORDERS = CategoryIdentifier("orders")


class Recorder(TransactionalEventProcessor):
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.fail_reset = False

    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        self.calls.append(("batch", [event.sequence_number for event in events]))

    async def on_reset(
        self, source: EventSourceIdentifier, after: int | None, transaction: ConsumerTransaction
    ) -> None:
        if self.fail_reset:
            raise RuntimeError("cannot clear")
        self.calls.append(("reset", after))


def consumer(backend: InMemoryBackend, processor: Recorder) -> EventSourceConsumer:
    return EventSourceConsumer(
        EventSource(backend, ORDERS),
        processor,
        EventConsumerStateStore(backend.checkpoints, "g", ORDERS),
        settings=ConsumerSettings(checkpoint_every=2),
    )


async def test_the_hook_runs_once_before_the_first_replayed_batch() -> None:
    backend = InMemoryBackend()
    stored = (
        await EventStore(backend)
        .stream(category="orders", stream="s")
        .publish([NewEvent(name="placed") for _ in range(4)])
    )
    numbers = [event.sequence_number for event in stored]
    processor = Recorder()
    assert await consumer(backend, processor).consume_all() == 4
    processor.calls.clear()

    await backend.groups.reset("g", after=numbers[1])
    assert await consumer(backend, processor).consume_all() == 2
    assert processor.calls == [("reset", numbers[1]), ("batch", numbers[2:])]
    checkpoint = await backend.checkpoints.get("g", ORDERS)
    assert checkpoint is not None and not checkpoint.reset_pending

    processor.calls.clear()
    await backend.groups.reset("g", after=numbers[-1])  # nothing left to replay
    assert await consumer(backend, processor).consume_all() == 0
    assert processor.calls == [("reset", numbers[-1])]
    checkpoint = await backend.checkpoints.get("g", ORDERS)
    assert checkpoint is not None and not checkpoint.reset_pending


async def test_a_failing_hook_leaves_the_reset_pending() -> None:
    backend = InMemoryBackend()
    await (
        EventStore(backend)
        .stream(category="orders", stream="s")
        .publish([NewEvent(name="placed") for _ in range(3)])
    )
    processor = Recorder()
    await consumer(backend, processor).consume_all()
    await backend.groups.reset("g", after=None)
    processor.fail_reset = True
    processor.calls.clear()
    with pytest.raises(RuntimeError):
        await consumer(backend, processor).consume_all()
    checkpoint = await backend.checkpoints.get("g", ORDERS)
    assert checkpoint is not None and checkpoint.reset_pending and checkpoint.after is None
    processor.fail_reset = False
    assert await consumer(backend, processor).consume_all() == 3
    assert processor.calls[0] == ("reset", None)

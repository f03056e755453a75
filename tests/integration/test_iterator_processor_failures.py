"""Iterator processors under the failure policy, on PostgreSQL: an auto-commit
processor's failing event is the one it pulled last; a managed processor that raised
with a batch unacknowledged is given the batch's events one at a time until the
failing one is found. Either way the failing stream is retried, parked (the rest of
the source flows on, each event applied once) and, after the fix, replayed in order."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from eventmill import CategoryIdentifier, NewEvent, StreamIdentifier
from eventmill.backends.postgres import PostgresBackend
from eventmill.consumers import (
    AutoCommitEventIteratorProcessor,
    ConsumerProgress,
    EventConsumerStateStore,
    EventSourceConsumer,
    ManagedEventIteratorProcessor,
)
from eventmill.consumers.failures import FailurePolicy, parked_streams, retry_parked
from eventmill.events import StoredEvent
from eventmill.services.error_handlers import ConstantBackoff
from eventmill.sources import EventSource
from eventmill.store import EventStore
from tests.postgres_support import fresh_postgres_backend

pytestmark = pytest.mark.postgres

ORDERS = CategoryIdentifier("orders")
POISON = ("bad", 0)


@pytest.fixture
async def backend() -> AsyncIterator[PostgresBackend]:
    async with fresh_postgres_backend() as postgres:
        await publish(postgres, "a", "bad", "a", "bad", "b", "b")
        yield postgres


async def publish(backend: PostgresBackend, *streams: str) -> None:
    store = EventStore(backend)
    for stream in streams:
        await store.stream(category="orders", stream=stream).publish(
            [NewEvent(name="order-placed", payload={})]
        )


class Applier:
    """Applies events (records them); refuses the poison event until fixed."""

    def __init__(self) -> None:
        self.fixed = False
        self.applied: list[tuple[str, int]] = []
        self.tries = 0

    def check(self, event: StoredEvent) -> None:
        if (event.stream, event.position) == POISON:
            self.tries += 1
            if not self.fixed:
                raise KeyError(f"no total in {event.stream}")


class AutoCommit(AutoCommitEventIteratorProcessor):
    def __init__(self, applier: Applier) -> None:
        self.applier = applier

    async def process(self, events: AsyncIterator[StoredEvent]) -> None:
        async for event in events:
            self.applier.check(event)
            self.applier.applied.append((event.stream, event.position))


class Batching(ManagedEventIteratorProcessor):
    """Pulls up to three events, checks them all, then applies and acknowledges them
    together: a failure leaves the whole batch unacknowledged."""

    def __init__(self, applier: Applier) -> None:
        self.applier = applier

    async def process(self, events: AsyncIterator[StoredEvent], progress: ConsumerProgress) -> None:
        batch: list[StoredEvent] = []
        async for event in events:
            batch.append(event)
            if len(batch) == 3:
                await self.flush(batch, progress)
        await self.flush(batch, progress)

    async def flush(self, batch: list[StoredEvent], progress: ConsumerProgress) -> None:
        for event in batch:
            self.applier.check(event)
        self.applier.applied.extend((event.stream, event.position) for event in batch)
        progress.acknowledge(batch)
        await progress.commit(force=True)
        batch.clear()


@pytest.mark.parametrize("kind", ["auto-commit", "managed"])
async def test_an_iterator_processor_retries_parks_and_replays(
    backend: PostgresBackend, kind: str
) -> None:
    applier = Applier()
    consumer = EventSourceConsumer(
        EventSource(backend, ORDERS),
        AutoCommit(applier) if kind == "auto-commit" else Batching(applier),
        EventConsumerStateStore(backend.checkpoints, "g", ORDERS, epoch=1),
        failure_policy=FailurePolicy(max_attempts=2, backoff=ConstantBackoff()),
    )
    batch_try = 1 if kind == "managed" else 0  # in the failing batch, before narrowing
    await consumer.consume_all()  # the first try fails: the pass ends there
    assert applier.tries == 1 + batch_try
    assert consumer.retrying
    await consumer.consume_all()  # the second fails too: parked, the rest flows
    assert applier.tries == 2 + batch_try
    assert applier.applied == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    [record] = await parked_streams(backend)
    assert (record.stream, record.position, record.held, record.attempts) == (
        StreamIdentifier("orders", "bad"),
        0,
        2,
        2,
    )
    assert record.error_type == "KeyError"
    checkpoint = await backend.checkpoints.get("g", ORDERS)
    assert checkpoint is not None and checkpoint.after == 6
    await publish(backend, "bad")
    assert await consumer.consume_all() == 1  # held: not tried
    assert applier.tries == 2 + batch_try
    applier.fixed = True
    await retry_parked(backend, "g", StreamIdentifier("orders", "bad"))
    await consumer.consume_all()
    assert applier.applied[4:] == [("bad", 0), ("bad", 1), ("bad", 2)]
    assert await parked_streams(backend) == []

"""A partitioned group in one process (SingletonEventBroker, real subscribers) keeps
every stream's order, and processes each event exactly once, while instances join
and leave and partitions move between them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import timedelta

from eventmill import CategoryIdentifier, NewEvent, make_subscriber
from eventmill.backends.base import Backend
from eventmill.broker.singleton import SingletonEventBroker
from eventmill.consumers import EventSubscriptionConsumer
from eventmill.events import CategoryPartitionIdentifier, StoredEvent
from eventmill.store import EventStore

STREAMS = 30
PARTITIONS = 16
DEADLINE = 30.0


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def publish_round(store: EventStore, number: int) -> None:
    for stream in range(STREAMS):
        await store.stream(category="orders", stream=f"order-{stream}").publish(
            [NewEvent(name="placed", payload={"round": number})]
        )


async def test_per_stream_order_and_exactly_once_across_rebalances(backend: Backend) -> None:
    store = EventStore(backend)
    processed: list[tuple[str, str, int]] = []  # (subscriber id, stream, position)
    broker = SingletonEventBroker(backend)
    running: dict[str, asyncio.Task[None]] = {}

    def instance(id: str) -> EventSubscriptionConsumer:
        async def record(event: StoredEvent) -> None:
            processed.append((id, event.stream, event.position))
            await asyncio.sleep(0)  # let rebalances interleave with passes

        return make_subscriber(
            backend,
            group="g",
            id=id,
            sources=CategoryIdentifier("orders"),
            processor=record,
            partitions=PARTITIONS,
            checkpoint_every=7,
            page_size=5,
        )

    async def consume(subscriber: EventSubscriptionConsumer) -> None:
        while True:
            await subscriber.consume_all()
            await subscriber.wait_for_new_events(timedelta(milliseconds=20))

    async def join(subscriber: EventSubscriptionConsumer) -> None:
        await broker.register(subscriber)
        running[subscriber.id] = asyncio.create_task(consume(subscriber))
        await broker.wait_ready()

    async def leave(subscriber: EventSubscriptionConsumer) -> None:
        await broker.unregister(subscriber)
        running.pop(subscriber.id).cancel()
        await broker.wait_ready()

    for number in range(10):
        await publish_round(store, number)
    broker_task = asyncio.create_task(broker.execute())
    try:
        a, b, c, d = (instance(name) for name in "abcd")
        await join(a)
        await wait_until(lambda: len(processed) >= 60, "a's first events")
        await join(b)
        await wait_until(lambda: len(processed) >= 120, "events after b joined")
        await join(c)
        for number in range(10, 20):
            await publish_round(store, number)
        await wait_until(lambda: len(processed) >= 300, "events after c joined")
        await leave(a)
        holders = {h.subscriber_id for h in broker.holdings() if h.subscriber_id}
        assert holders == {"b", "c"}
        await wait_until(lambda: len(processed) >= 420, "events after a left")
        await join(d)
        for number in range(20, 25):
            await publish_round(store, number)
        total = STREAMS * 25
        await wait_until(lambda: len(processed) >= total, "every event")
        for subscriber in (b, c, d):  # graceful: in-flight batches finish first
            await leave(subscriber)
    finally:
        for task in running.values():
            task.cancel()
        broker_task.cancel()
        await asyncio.gather(broker_task, *running.values(), return_exceptions=True)

    assert len(processed) == total  # nothing repeated
    for stream in range(STREAMS):
        name = f"order-{stream}"
        assert [p for _, s, p in processed if s == name] == list(range(25)), name
    assert {id for id, _, _ in processed} == {"a", "b", "c", "d"}
    partitions = {CategoryPartitionIdentifier("orders", n, PARTITIONS) for n in range(PARTITIONS)}
    checkpoints = {c.source: c.after for c in await backend.checkpoints.list("g")}
    assert set(checkpoints) == partitions

"""The shared tail: subscribers of many groups on one node following one category share
its reads, and each still gets every event once, in order."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import timedelta
from functools import partial
from typing import Any

from eventmill.backends.memory import InMemoryBackend
from eventmill.consumers import make_subscriber
from eventmill.events import CategoryIdentifier, LogIdentifier, NewEvent, StoredEvent
from eventmill.shared_tail import WINDOW_EVENTS, shared_tail
from eventmill.sources import EventSource
from eventmill.store import EventStore
from tests.unit.services.conditions import wait_until

ORDERS = CategoryIdentifier("orders")
GROUPS = 20


class CountedReads:
    """Counts the storage reads of a backend (shadowing ``read`` on its event storage)."""

    def __init__(self, backend: InMemoryBackend) -> None:
        self.count = 0
        original: Callable[..., Awaitable[list[StoredEvent]]] = backend.events.read

        async def read(*args: Any, **kwargs: Any) -> list[StoredEvent]:
            self.count += 1
            await asyncio.sleep(0)  # a read takes a turn of the loop, as on PostgreSQL
            return await original(*args, **kwargs)

        backend.events.read = read  # type: ignore[method-assign]


def all_seen(seen: dict[str, list[int]], count: int) -> bool:
    return all(len(numbers) == count for numbers in seen.values())


async def test_twenty_groups_share_reads_and_each_sees_every_event_once_in_order() -> None:
    backend = InMemoryBackend()
    reads = CountedReads(backend)
    seen: dict[str, list[int]] = {f"group-{n}": [] for n in range(GROUPS)}
    runners = []
    for group in seen:

        async def record(event: StoredEvent, into: list[int] = seen[group]) -> None:
            into.append(event.payload["n"])  # type: ignore[arg-type]

        subscriber = make_subscriber(backend, group=group, sources=ORDERS, processor=record)
        await subscriber.accept(ORDERS, 1)

        async def run(subscriber: Any = subscriber) -> None:
            while True:  # wake-ups only: a missed one would stall the test
                await subscriber.consume_all()
                await subscriber.wait_for_new_events(within=timedelta(hours=1))

        runners.append(asyncio.create_task(run()))
    try:
        await wait_until(lambda: reads.count >= GROUPS, 20)
        stream = EventStore(backend).stream(category="orders", stream="o-1")
        bursts = 30
        published = 0
        before = reads.count
        for _ in range(bursts):
            batch = [NewEvent(name="placed", payload={"n": published + k}) for k in range(3)]
            await stream.publish(batch)
            published += len(batch)
            await wait_until(partial(all_seen, seen, published), 20)
        per_burst = (reads.count - before) / bursts
    finally:
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
    for numbers in seen.values():
        assert numbers == list(range(published))
    # Unshared, every group reads at least once per burst (20 per burst).
    assert per_burst <= 4, per_burst


async def test_reads_through_the_tail_match_direct_reads_while_publishing() -> None:
    backend = InMemoryBackend()
    store = EventStore(backend)
    chooser = random.Random(18)
    sources = [EventSource(backend, LogIdentifier(), shared_tail=True) for _ in range(4)]
    places = [0, 0, 0, 0]
    total = 0
    for _ in range(300):
        count = chooser.randint(0, 40)
        if count:
            await store.stream(category="c", stream=f"s{chooser.randint(0, 5)}").publish(
                [NewEvent(name="e", payload={}) for _ in range(count)]
            )
            total += count
        reader = chooser.randrange(len(sources))
        if chooser.random() < 0.05:  # some readers fall back (below the window)
            places[reader] = chooser.randint(0, total)
        limit = chooser.randint(1, 700)
        page = await sources[reader].read(after=places[reader], limit=limit)
        expected = await backend.events.read(LogIdentifier(), after=places[reader], limit=limit)
        assert page == expected[: len(page)]
        assert len(page) == limit or not page or page[-1].sequence_number <= total
        if page:
            places[reader] = page[-1].sequence_number
    # Each reader, read to the end after a wake-up, reaches the last event.
    shared_tail(backend.events, LogIdentifier()).woken()
    for source in sources:
        last = [event async for event in source.iterate(after=0)][-1]
        assert last.sequence_number == total


async def test_pages_through_the_tail_come_whole_whatever_the_batch() -> None:
    """Lists of a page read through the tail would cost the consumer per-list work and
    spread no decoding (the events are decoded already): a node's drain ran 25 % slower
    in lists of 100."""
    backend = InMemoryBackend()
    await (
        EventStore(backend)
        .stream(category="c", stream="one")
        .publish([NewEvent(name="e") for _ in range(25)])
    )
    source = EventSource(backend, CategoryIdentifier("c"), page_size=10, shared_tail=True)
    sizes = [len(page) async for page in source.pages(after=0, batch=4)]
    assert sizes == [10, 10, 5]


async def test_the_window_keeps_at_most_its_size_and_readers_below_it_read_directly() -> None:
    backend = InMemoryBackend()
    stream = EventStore(backend).stream(category="c", stream="one")
    for _ in range(WINDOW_EVENTS // 1_000 + 2):
        await stream.publish([NewEvent(name="e") for _ in range(1_000)])
    source = EventSource(backend, CategoryIdentifier("c"), shared_tail=True)
    numbers = [event.sequence_number async for event in source.iterate(after=0)]
    assert numbers == list(range(1, len(numbers) + 1))
    assert len(numbers) == (WINDOW_EVENTS // 1_000 + 2) * 1_000
    late = EventSource(backend, CategoryIdentifier("c"), shared_tail=True)
    assert [event.sequence_number for event in await late.read(after=0, limit=3)] == [1, 2, 3]
    assert len(shared_tail(backend.events, CategoryIdentifier("c"))._events) <= WINDOW_EVENTS


async def test_a_read_returns_though_wake_ups_arrive_during_every_fetch() -> None:
    """Publishes to other partitions of a category wake every partition's tail: a read
    waited for a fetch begun after the latest wake-up, so one arriving during each fetch
    kept it fetching for ever with events pending. Later wake-ups start another pass."""
    backend = InMemoryBackend()
    store = EventStore(backend)
    await store.stream(category="c", stream="s").publish([NewEvent(name="e") for _ in range(5)])
    source = EventSource(backend, CategoryIdentifier("c"), shared_tail=True)
    assert len(await source.read(after=0, limit=3)) == 3  # the window: (0, 3] of (0, 5]
    tail = shared_tail(backend.events, CategoryIdentifier("c"))
    original: Callable[..., Awaitable[list[StoredEvent]]] = backend.events.read
    fetches = 0

    async def read_while_woken(*args: Any, **kwargs: Any) -> list[StoredEvent]:
        nonlocal fetches
        fetches += 1
        assert fetches < 20, "the read does not return"
        tail.woken()  # a notification arrives while the fetch is under way
        return await original(*args, **kwargs)

    backend.events.read = read_while_woken  # type: ignore[method-assign]
    tail.woken()
    page = await source.read(after=3, limit=10)
    assert [event.sequence_number for event in page] == [4, 5]
    assert fetches == 1

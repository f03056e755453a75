"""Partition reads, run against every backend: the partitions of a category split it
exactly, each in sequence-number order, and reads resume and page like category reads."""

from __future__ import annotations

import pytest

from eventmill import CategoryPartitionIdentifier, NewEvent
from eventmill.events import StoredEvent
from eventmill.store import EventStore


async def publish_interleaved(store: EventStore, streams: int, rounds: int) -> None:
    """``rounds`` events on each of ``streams`` streams of ``orders``, interleaved, with
    events of another category in between."""
    for round_number in range(rounds):
        for number in range(streams):
            await store.stream(category="orders", stream=f"order-{number}").publish(
                [NewEvent(name="placed", payload={"round": round_number})]
            )
        await store.stream(category="other", stream="order-0").publish([NewEvent(name="noise")])


async def read_all(store: EventStore, source: CategoryPartitionIdentifier) -> list[StoredEvent]:
    return [event async for event in store.source(source).iterate(page_size=7)]


@pytest.mark.parametrize("count", [1, 2, 16, 64])
async def test_the_partitions_of_a_category_split_it_exactly_and_in_order(
    store: EventStore, count: int
) -> None:
    await publish_interleaved(store, streams=40, rounds=3)
    category = await store.category("orders").read(limit=1000)
    parts = [
        await read_all(store, CategoryPartitionIdentifier("orders", part, count))
        for part in range(count)
    ]
    for number, part in enumerate(parts):
        assert part == [
            e
            for e in category
            if CategoryPartitionIdentifier("orders", number, count).contains(e.stream)
        ]
    assert sorted(e.sequence_number for part in parts for e in part) == [
        e.sequence_number for e in category
    ]


async def test_a_partition_read_resumes_after_a_sequence_number_and_honours_the_limit(
    store: EventStore,
) -> None:
    await publish_interleaved(store, streams=30, rounds=4)
    partition = CategoryPartitionIdentifier("orders", 3, 4)
    everything = await read_all(store, partition)
    assert len(everything) > 10
    source = store.source(partition)
    assert await source.read(limit=5) == everything[:5]
    middle = everything[6].sequence_number
    assert await source.read(after=middle, limit=3) == everything[7:10]
    assert await source.read(after=middle - 1, limit=1) == everything[6:7]
    assert await source.read(after=everything[-1].sequence_number) == []


async def test_the_latest_event_of_each_partition(store: EventStore) -> None:
    for count in (1, 8):
        assert await store.source(CategoryPartitionIdentifier("orders", 0, count)).latest() is None
    await publish_interleaved(store, streams=20, rounds=2)
    category = await store.category("orders").read(limit=1000)
    for count in (1, 8, 64):
        for part in range(count):
            partition = CategoryPartitionIdentifier("orders", part, count)
            inside = [e for e in category if partition.contains(e.stream)]
            assert await store.source(partition).latest() == (inside[-1] if inside else None)


async def test_a_partition_sees_events_published_after_an_earlier_read(store: EventStore) -> None:
    partition = CategoryPartitionIdentifier("orders", 1, 2)
    assert await store.source(partition).read() == []
    stream = next(f"s-{n}" for n in range(100) if partition.contains(f"s-{n}"))
    first = await store.stream(category="orders", stream=stream).publish([NewEvent(name="a")])
    assert await store.source(partition).read() == first
    second = await store.stream(category="orders", stream=stream).publish([NewEvent(name="b")])
    assert await store.source(partition).read(after=first[0].sequence_number) == second

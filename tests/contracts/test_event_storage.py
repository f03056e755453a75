"""The event storage contract, run against every backend."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from eventmill import (
    CategoryIdentifier,
    CategoryPartitionIdentifier,
    InvalidEventError,
    InvalidInputError,
    NewEvent,
    StreamIdentifier,
    UnmetWriteConditionError,
    position_is,
    stream_is_empty,
)
from eventmill.backends.base import Backend
from eventmill.backends.memory import InMemoryBackend
from eventmill.events import JsonObject, JsonValue
from eventmill.store import EventStore


def events(count: int, name: str = "happened") -> list[NewEvent]:
    return [NewEvent(name=name, payload={"n": number}) for number in range(count)]


async def test_publish_returns_stored_events_with_positions_and_sequence_numbers(
    store: EventStore,
) -> None:
    occurred = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    first = await store.stream(category="orders", stream="o-1").publish(
        [
            NewEvent(
                name="placed", payload={"total": 10}, metadata={"who": "a"}, occurred_at=occurred
            )
        ]
    )
    second = await store.stream(category="orders", stream="o-1").publish(events(2))
    assert [e.position for e in first + second] == [0, 1, 2]
    numbers = [e.sequence_number for e in first + second]
    assert numbers == sorted(numbers) and len(set(numbers)) == 3
    stored = first[0]
    assert (stored.name, stored.category, stored.stream) == ("placed", "orders", "o-1")
    assert stored.payload == {"total": 10} and stored.metadata == {"who": "a"}
    assert stored.occurred_at == occurred
    assert stored.observed_at.tzinfo is not None
    assert len({e.id for e in first + second}) == 3
    assert await store.stream(category="orders", stream="o-1").read() == first + second


async def test_reads_of_log_category_and_stream_are_ordered_and_resume(store: EventStore) -> None:
    for number in range(30):
        await store.stream(category=f"c{number % 3}", stream=f"s{number % 5}").publish(events(2))
    log = await store.log().read()
    assert len(log) == 60
    assert [e.sequence_number for e in log] == sorted(e.sequence_number for e in log)
    category = await store.category("c1").read()
    assert category == [e for e in log if e.category == "c1"]
    middle = category[7].sequence_number
    assert await store.category("c1").read(after=middle) == category[8:]
    stream = await store.stream(category="c1", stream="s1").read()
    assert [e.position for e in stream] == list(range(len(stream)))
    assert await store.stream(category="c1", stream="s1").read(after=1) == stream[2:]
    assert await store.log().read(after=log[-1].sequence_number) == []


async def test_reads_after_a_place_beyond_any_sequence_number_return_nothing(
    store: EventStore,
) -> None:
    await store.stream(category="c", stream="s").publish(events(2))
    for beyond in (2**63 - 1, 2**63, 10**30):
        assert await store.log().read(after=beyond) == []
        assert await store.category("c").read(after=beyond) == []
        assert await store.source(CategoryPartitionIdentifier("c", 0, 2)).read(after=beyond) == []
        assert await store.stream(category="c", stream="s").read(after=beyond) == []


async def test_iterate_pages_through_everything_and_sees_later_pages(store: EventStore) -> None:
    stream = store.stream(category="big", stream="one")
    for _ in range(5):
        await stream.publish(events(100))
    seen = [e.position async for e in stream.iterate(page_size=7)]
    assert seen == list(range(500))
    numbers = [e.sequence_number async for e in store.category("big").iterate(page_size=33)]
    assert len(numbers) == 500 and numbers == sorted(numbers)
    assert len(await store.category("big").read(limit=120)) == 120


async def test_pages_in_batches_hand_out_every_event_once_in_order(backend: Backend) -> None:
    """PostgreSQL hands a page out in lists of at most ``batch`` (each decoded when asked
    for); events already in memory come a whole page at a time."""
    store = EventStore(backend)
    await store.stream(category="big", stream="one").publish(events(23))
    big = CategoryIdentifier("big")

    async def handed_out(after: int | None, batch: int | None) -> list[list[JsonValue]]:
        pages = backend.events.pages(big, after=after, limit=10, batch=batch)
        return [[event.payload["n"] for event in page] async for page in pages]

    whole = [list(range(10)), list(range(10, 20)), [20, 21, 22]]
    assert await handed_out(None, None) == whole
    assert await handed_out(None, 10) == whole
    if isinstance(backend, InMemoryBackend):
        assert await handed_out(None, 4) == whole
    else:
        assert await handed_out(None, 4) == [
            [0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15, 16, 17], [18, 19],
            [20, 21, 22],
        ]  # fmt: skip
    last = (await store.category("big").read())[-1].sequence_number
    assert await handed_out(last, 4) == [[]]


async def test_latest_of_each_source(store: EventStore) -> None:
    assert await store.log().latest() is None
    assert await store.stream(category="a", stream="x").latest() is None
    await store.stream(category="a", stream="x").publish(events(3))
    last = (await store.stream(category="b", stream="y").publish(events(2)))[-1]
    assert await store.log().latest() == last
    assert (await store.category("a").latest()).position == 2  # type: ignore[union-attr]
    assert (await store.stream(category="a", stream="x").latest()).position == 2  # type: ignore[union-attr]


async def test_partition_reads_split_a_category_by_stream(store: EventStore) -> None:
    for number in range(20):
        await store.stream(category="p", stream=f"s{number}").publish(events(2))
    everything = await store.category("p").read()
    parts = [
        await store.source(CategoryPartitionIdentifier("p", part, 4)).read() for part in range(4)
    ]
    assert sorted(e.sequence_number for part in parts for e in part) == [
        e.sequence_number for e in everything
    ]
    for number, part in enumerate(parts):
        assert [e.sequence_number for e in part] == sorted(e.sequence_number for e in part)
        assert all(CategoryPartitionIdentifier("p", number, 4).contains(e.stream) for e in part)
    assert (
        await store.source(CategoryPartitionIdentifier("p", 0, 4)).read(
            after=parts[0][2].sequence_number
        )
        == parts[0][3:]
    )


async def test_conditions_hold_atomically_and_refuse_without_writing(store: EventStore) -> None:
    stream = store.stream(category="orders", stream="o-1")
    await stream.publish(events(1), condition=stream_is_empty())
    with pytest.raises(UnmetWriteConditionError) as refused:
        await stream.publish(events(1), condition=stream_is_empty())
    assert refused.value.found == 0
    assert str(refused.value.expected) == "stream_is_empty()"
    await stream.publish(events(2), condition=position_is(0))
    with pytest.raises(UnmetWriteConditionError) as stale:
        await stream.publish(events(1), condition=position_is(0) | stream_is_empty())
    assert stale.value.found == 2
    await stream.publish(events(1), condition=position_is(2) | stream_is_empty())
    with pytest.raises(UnmetWriteConditionError):
        await stream.publish(events(1), condition=position_is(3) & stream_is_empty())
    assert [e.position for e in await stream.read()] == [0, 1, 2, 3]
    assert len(await store.log().read()) == 4


async def test_racing_writers_with_the_same_condition_one_wins(store: EventStore) -> None:
    for round_number in range(20):
        stream = store.stream(category="race", stream=f"r{round_number}")
        await stream.publish(events(1))
        outcomes = await asyncio.gather(
            *(stream.publish(events(2), condition=position_is(0)) for _ in range(4)),
            return_exceptions=True,
        )
        winners = [o for o in outcomes if isinstance(o, list)]
        losers = [o for o in outcomes if isinstance(o, UnmetWriteConditionError)]
        assert (len(winners), len(losers)) == (1, 3), outcomes
        assert [e.position for e in await stream.read()] == [0, 1, 2]


@pytest.mark.parametrize(
    "payload",
    [
        {"s": {1, 2}},
        {"nan": float("nan")},
        {"inf": float("-inf")},
        {"b": b"x"},
        {1: "non-string key"},
        {"nul": "a\x00b"},
        {"surrogate": "\ud800"},
        {"tuple": (1, 2)},
        {"deep": [{"ok": 1}, {"bad": object()}]},
        ["not", "an", "object"],
    ],
)
async def test_bad_payloads_are_refused_before_anything_is_written(
    store: EventStore, payload: object
) -> None:
    with pytest.raises(InvalidEventError):
        await store.stream(category="c", stream="s").publish(
            [NewEvent(name="ok"), NewEvent(name="bad", payload=payload)]  # type: ignore[arg-type]
        )
    assert await store.log().read() == []


@pytest.mark.parametrize("name", ["", "x" * 256, "a\x00", 3, None])
async def test_bad_names_are_refused(store: EventStore, name: object) -> None:
    with pytest.raises(InvalidInputError):
        NewEvent(name=name)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        store.stream(category=name, stream="s")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        store.stream(category="c", stream=name)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        store.category(name)  # type: ignore[arg-type]


async def test_bad_publish_arguments_are_refused(store: EventStore) -> None:
    stream = store.stream(category="c", stream="s")
    with pytest.raises(InvalidEventError):
        await stream.publish([])
    with pytest.raises(InvalidEventError):
        await stream.publish(NewEvent(name="x"))  # type: ignore[arg-type]
    with pytest.raises(InvalidEventError):
        await stream.publish([{"name": "x"}])
    with pytest.raises(InvalidInputError):
        await stream.publish(events(1), condition="empty")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        await stream.read(after=-1)
    with pytest.raises(InvalidInputError):
        [e async for e in stream.iterate(page_size=0)]
    with pytest.raises(InvalidEventError):
        NewEvent(name="x", occurred_at=datetime(2025, 1, 1))  # naive
    assert await store.log().read() == []


async def test_unusual_but_valid_names_and_payloads_round_trip(store: EventStore) -> None:
    category = "o'rders; DROP TABLE events; --"
    stream_name = 'ström "quoted" 😀 ' + "y" * 230
    payload: JsonObject = {
        "ключ": ["ü", 1, 2.5, True, None, {"nested": []}],
        "big": 2**70,
        "": "empty key",
    }
    stored = await store.stream(category=category, stream=stream_name).publish(
        [NewEvent(name="n'; --", payload=payload)]
    )
    [read] = await store.stream(category=category, stream=stream_name).read()
    assert read == stored[0]
    assert read.payload == payload
    assert (await store.category(category).read()) == stored
    assert StreamIdentifier(category, stream_name) == StreamIdentifier(category, stream_name)
    assert CategoryIdentifier(category) in {CategoryIdentifier(category)}


async def test_changing_the_callers_payload_does_not_change_the_stored_event(
    store: EventStore,
) -> None:
    payload: dict[str, Any] = {"items": [1], "inner": {"a": "b"}, "n": 1}
    event = NewEvent(name="x", payload=payload)
    payload["items"].append(2)
    payload["inner"]["a"] = "c"
    payload["n"] = 2
    payload["added"] = True
    [published] = await store.stream(category="c", stream="s").publish([event])
    payload["inner"]["d"] = "e"
    [stored] = await store.log().read()
    assert stored.payload == published.payload == {"items": [1], "inner": {"a": "b"}, "n": 1}

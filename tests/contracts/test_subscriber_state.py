"""The SubscriberStateStore contract (who is alive), run against every backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest

from eventmill import (
    CategoryIdentifier,
    CategoryPartitionIdentifier,
    InvalidIdentifierError,
    InvalidSettingsError,
    LogIdentifier,
    StreamIdentifier,
    identifier_from_json,
)
from eventmill.backends.base import Backend, SubscriberRecord

REQUESTS = (
    CategoryIdentifier("orders"),
    LogIdentifier(),
    StreamIdentifier("orders", "o-1"),
    CategoryPartitionIdentifier("orders", 3, 8),
)


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 10) -> None:
    """Return once ``check()`` is true; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def ids(records: list[SubscriberRecord]) -> list[tuple[str, str]]:
    return [(record.group, record.id) for record in records]


async def test_register_then_list(backend: Backend) -> None:
    store = backend.subscribers
    record = await store.register("totals", "sub-1", "node-a", REQUESTS)
    assert (record.group, record.id, record.node_id) == ("totals", "sub-1", "node-a")
    assert record.subscription_requests == REQUESTS
    assert record.registered_at == record.last_seen
    assert record.last_seen.tzinfo is not None
    assert await store.list() == [record]
    assert await store.list(group="totals", max_age=timedelta(minutes=5)) == [record]
    assert await store.list(group="other") == []


async def test_list_is_ordered_by_group_registration_and_id(backend: Backend) -> None:
    store = backend.subscribers
    await store.register("b", "sub-2", "n", ())
    await store.register("b", "sub-1", "n", ())
    await store.register("a", "sub-9", "n", ())
    records = await store.list()
    assert [r.group for r in records] == ["a", "b", "b"]
    assert records == sorted(records, key=lambda r: (r.group, r.registered_at, r.id))
    assert ids(await store.list(group="b")) == ids(records[1:])


async def test_equal_requests_of_a_group_share_one_tuple(backend: Backend) -> None:
    store = backend.subscribers
    for number in range(3):
        copies = tuple(identifier_from_json(source.to_json()) for source in REQUESTS)
        await store.register("totals", f"sub-{number}", "node-a", copies)
    await store.register("totals", "odd", "node-a", REQUESTS[:2])
    requests = {r.id: r.subscription_requests for r in await store.list(group="totals")}
    assert requests["odd"] == REQUESTS[:2]
    assert requests["sub-0"] == REQUESTS
    assert requests["sub-0"] is requests["sub-1"] is requests["sub-2"]


async def test_heartbeat_refreshes_and_updates_and_keeps_the_registration(
    backend: Backend,
) -> None:
    store = backend.subscribers
    first = await store.register("totals", "sub-1", "node-a", REQUESTS)
    beat = await store.heartbeat("totals", "sub-1", "node-b", REQUESTS[:1])
    assert beat.registered_at == first.registered_at
    assert beat.last_seen >= first.last_seen
    assert (beat.node_id, beat.subscription_requests) == ("node-b", REQUESTS[:1])
    assert await store.list() == [beat]
    again = await store.register("totals", "sub-1", "node-a", REQUESTS)
    assert again.registered_at >= first.registered_at and again.registered_at == again.last_seen


async def test_heartbeat_recreates_a_missing_record(backend: Backend) -> None:
    store = backend.subscribers
    await store.register("totals", "sub-1", "node-a", REQUESTS)
    await store.remove("totals", "sub-1")
    assert await store.list() == []
    await store.remove("totals", "sub-1")  # harmless
    beat = await store.heartbeat("totals", "sub-1", "node-a", REQUESTS)
    assert beat.registered_at == beat.last_seen
    assert await store.list() == [beat]


async def test_max_age_hides_the_silent_until_they_beat_again(backend: Backend) -> None:
    store = backend.subscribers
    await store.register("totals", "quiet", "node-a", ())
    short = timedelta(milliseconds=200)

    async def quiet_is_old() -> bool:
        return ids(await store.list(max_age=short)) == []

    await eventually(quiet_is_old)
    assert ids(await store.list()) == [("totals", "quiet")]  # no max_age: everyone
    await store.heartbeat("totals", "quiet", "node-a", ())
    assert ids(await store.list(max_age=timedelta(minutes=5))) == [("totals", "quiet")]


async def test_purge_deletes_only_the_records_older_than_max_age(backend: Backend) -> None:
    store = backend.subscribers
    await store.register("totals", "dead", "node-a", ())
    age = timedelta(seconds=1)

    async def dead_is_old() -> bool:
        return await store.list(max_age=age) == []

    await eventually(dead_is_old)
    await store.register("totals", "alive", "node-b", ())
    assert await store.purge(age) == 1
    assert ids(await store.list()) == [("totals", "alive")]
    assert await store.purge(timedelta(minutes=5)) == 0


async def test_bad_input_is_refused(backend: Backend) -> None:
    store = backend.subscribers
    with pytest.raises(InvalidIdentifierError):
        await store.register("", "sub-1", "node-a", ())
    with pytest.raises(InvalidIdentifierError):
        await store.heartbeat("totals", "sub-1", "\x00", ())
    with pytest.raises(InvalidIdentifierError):
        await store.register("totals", "sub-1", "node-a", ["orders"])  # type: ignore[list-item]
    with pytest.raises(InvalidSettingsError):
        await store.list(max_age=timedelta(seconds=-1))
    with pytest.raises(InvalidSettingsError):
        await store.purge(3)  # type: ignore[arg-type]
    assert await store.list() == []

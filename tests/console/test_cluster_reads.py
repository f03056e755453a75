"""read_cluster on every backend: lags counted from changes between reads stay equal
to a count from scratch while events arrive and checkpoints move forward and back;
throughput counts the events checkpoints moved past. On PostgreSQL: an open publish is
named with the committed events behind it, counted in the lag, and warned about once
older than the bound."""

from __future__ import annotations

from datetime import timedelta

import pytest

from eventmill.backends.base import Assign, Backend
from eventmill.backends.memory import InMemoryBackend
from eventmill.console.cluster import ClusterState, ConsoleSettings, read_cluster
from eventmill.events import (
    CategoryIdentifier,
    CategoryPartitionIdentifier,
    EventSourceIdentifier,
    NewEvent,
    StreamIdentifier,
)
from eventmill.store import EventStore
from tests.postgres_support import fresh_postgres_backend, open_publish

SOURCES: list[EventSourceIdentifier] = [
    CategoryPartitionIdentifier("orders", 0, 2),
    CategoryPartitionIdentifier("orders", 1, 2),
    StreamIdentifier("orders", "order-1"),
]


def lags(state: ClusterState) -> dict[str, int]:
    return {source["key"]: source["lag"] for group in state.groups for source in group["sources"]}


async def test_lags_counted_from_changes_equal_lags_counted_from_scratch(
    backend: Backend,
) -> None:
    store = EventStore(backend)
    await backend.subscribers.register("g", "g-1", "node-1", SOURCES)
    await backend.subscriptions.apply(
        [
            Assign(group="g", source=source, subscriber_id="g-1", node_id="node-1", epoch=1)
            for source in SOURCES
        ]
    )
    # every lag counted from changes (none is small enough to count from scratch)
    settings = ConsoleSettings(subscriber_max_age=timedelta(hours=1), count_changes_above=-1)
    state = await read_cluster(backend, settings)
    versions: dict[int, int | None] = {}
    for step in range(12):
        for number in range(5):
            await store.stream(category="orders", stream=f"order-{number}").publish(
                [NewEvent(name="placed", payload={"step": step})] * (1 + step % 3)
            )
        for index, source in enumerate(SOURCES):
            events = await backend.events.read(source, after=None, limit=1000)
            if not events:
                continue
            # forward most steps, back to the start every fifth
            chosen = events[(step * 7 + index) % len(events)] if step % 5 != 4 else None
            place = None
            if chosen is not None:
                stream = isinstance(source, StreamIdentifier)
                place = chosen.position if stream else chosen.sequence_number
            saved = await backend.checkpoints.save(
                "g", source, place, expected_version=versions.get(index)
            )
            versions[index] = saved.version
        state = await read_cluster(backend, settings, state)
        fresh = await read_cluster(backend, settings)
        assert lags(state) == lags(fresh), step
        assert sum(lags(state).values()) > 0 or step == 0


async def test_throughput_counts_what_checkpoints_moved_past(backend: Backend) -> None:
    store = EventStore(backend)
    source = StreamIdentifier("orders", "order-1")
    await backend.subscribers.register("g", "g-1", "node-1", [source])
    await backend.subscriptions.apply(
        [Assign(group="g", source=source, subscriber_id="g-1", node_id="node-1", epoch=1)]
    )
    await store.stream(category="orders", stream="order-1").publish([NewEvent(name="e")] * 10)
    settings = ConsoleSettings(subscriber_max_age=timedelta(hours=1))
    first = await read_cluster(backend, settings)
    assert first.groups[0]["throughput"] is None and first.groups[0]["lag"] == 10
    assert first.groups[0]["processed"] == 0
    await backend.checkpoints.save("g", source, 6, expected_version=None)
    second = await read_cluster(backend, settings, first)
    assert second.groups[0]["lag"] == 3
    assert second.groups[0]["processed"] == 7 and second.groups[0]["throughput"] > 0


@pytest.mark.postgres
async def test_an_open_publish_and_the_events_behind_it() -> None:
    source = CategoryIdentifier("orders")
    async with fresh_postgres_backend() as backend:
        await backend.subscribers.register("g", "g-1", "node-1", [source])
        await backend.subscriptions.apply(
            [Assign(group="g", source=source, subscriber_id="g-1", node_id="node-1", epoch=1)]
        )
        stream = EventStore(backend).stream(category="orders", stream="order-1")
        settings = ConsoleSettings(subscriber_max_age=timedelta(hours=1))
        state = await read_cluster(backend, settings)
        assert state.read_holdback is not None and state.read_holdback["oldest"] is None
        async with open_publish(backend, "stuck-publisher") as (pid, xid):
            await stream.publish([NewEvent(name="e")] * 7)
            state = await read_cluster(backend, settings, state)
            holdback = state.to_json()["read_holdback"]
            assert holdback["oldest"]["pid"] == pid
            assert holdback["oldest"]["transaction_id"] == xid
            assert holdback["oldest"]["application_name"] == "stuck-publisher"
            assert holdback["events_beyond"] == 7
            assert list(lags(state).values()) == [7]
            assert await backend.events.read(source, after=None, limit=10) == []
            assert not any(w.startswith("reads held back") for w in state.warnings)
            eager = ConsoleSettings(
                subscriber_max_age=timedelta(hours=1), held_back_warning_seconds=0.0
            )
            state = await read_cluster(backend, eager, state)
            (held,) = [w for w in state.warnings if w.startswith("reads held back")]
            assert f"pid {pid}, xid {xid}, application_name 'stuck-publisher'" in held
        state = await read_cluster(backend, settings, state)
        assert state.read_holdback is not None and state.read_holdback["oldest"] is None
        assert state.read_holdback["events_beyond"] == 0


async def test_nothing_holds_readers_back_in_memory() -> None:
    state = await read_cluster(InMemoryBackend(), ConsoleSettings())
    assert state.read_holdback is None and state.to_json()["read_holdback"] is None

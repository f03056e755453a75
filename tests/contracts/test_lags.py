"""EventStorage.lags and LockManager.holder, run against every backend: the counts
equal what reading from each place returns, for every kind of source."""

from __future__ import annotations

from eventmill import (
    CategoryIdentifier,
    CategoryPartitionIdentifier,
    LogIdentifier,
    NewEvent,
    StreamIdentifier,
)
from eventmill.backends.base import Backend
from eventmill.events import EventSourceIdentifier
from eventmill.store import EventStore


async def test_lags_count_the_events_after_each_place(backend: Backend) -> None:
    store = EventStore(backend)
    for round_number in range(3):
        for number in range(12):
            await store.stream(category="orders", stream=f"order-{number}").publish(
                [NewEvent(name="placed", payload={"round": round_number})] * 2
            )
        await store.stream(category="other", stream="x").publish([NewEvent(name="noise")])
    everything = await backend.events.read(LogIdentifier(), after=None, limit=1000)
    middle = everything[len(everything) // 2].sequence_number
    sources: list[EventSourceIdentifier] = [
        LogIdentifier(),
        CategoryIdentifier("orders"),
        CategoryIdentifier("missing"),
        CategoryPartitionIdentifier("orders", 1, 4),
        CategoryPartitionIdentifier("orders", 0, 1),
        StreamIdentifier("orders", "order-3"),
    ]
    places: list[tuple[EventSourceIdentifier, int | None]] = []
    for source in sources:
        places += [(source, None), (source, 2 if isinstance(source, StreamIdentifier) else middle)]
        places.append((source, 10**9))
    lags = await backend.events.lags(places)
    assert len(lags) == len(places)
    for (source, after), lag in zip(places, lags, strict=True):
        unread = await backend.events.read(source, after=after, limit=1000)
        assert lag.events == len(unread), (source, after)
        assert lag.oldest_at == (unread[0].observed_at if unread else None), (source, after)
    assert await backend.events.lags([]) == []


async def test_holder_names_who_holds_a_lock(backend: Backend) -> None:
    assert await backend.locks.holder("leader") is None
    lock = await backend.locks.try_lock("leader")
    assert lock is not None
    holder = await backend.locks.holder("leader")
    assert holder is not None
    session = getattr(lock, "backend_pid", None)
    assert holder.session == session
    assert await backend.locks.holder("other") is None
    await lock.release()
    assert await backend.locks.holder("leader") is None

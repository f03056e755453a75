"""EventStorage.lags and LockManager.holder, run against every backend: the counts
equal what reading each span returns, for every kind of source."""

from __future__ import annotations

from eventmill import (
    CategoryIdentifier,
    CategoryPartitionIdentifier,
    LogIdentifier,
    NewEvent,
    StreamIdentifier,
)
from eventmill.backends.base import Backend, LagPlace
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
    places: list[LagPlace] = []
    for source in sources:
        mid = 2 if isinstance(source, StreamIdentifier) else middle
        places += [(source, None, None), (source, mid, None), (source, 10**9, None)]
        places += [(source, None, mid), (source, mid, mid), (source, mid, 10**9), (source, 0, 1)]
    lags = await backend.events.lags(places)
    assert len(lags) == len(places)
    for (source, after, through), lag in zip(places, lags, strict=True):
        unread = await backend.events.read(source, after=after, limit=1000)
        spot = [
            e.position if isinstance(source, StreamIdentifier) else e.sequence_number
            for e in unread
        ]
        counted = [place for place in spot if through is None or place <= through]
        assert lag.events == len(counted), (source, after, through)
        assert lag.newest == (counted[-1] if counted else None), (source, after, through)
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

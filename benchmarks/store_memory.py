"""In-memory append and read throughput: single-event publishes at 1,000 and at
1,000,000 stored events, batches of 100, and category reads."""

from __future__ import annotations

import time

from benchmarks.common import median, report
from eventmill.backends.memory import InMemoryBackend
from eventmill.events import NewEvent
from eventmill.store import EventStore

REPEATS = 3


async def single_event_rate(store: EventStore, count: int, stream_count: int = 100) -> float:
    streams = [store.stream(category="bench", stream=f"s{n}") for n in range(stream_count)]
    started = time.perf_counter()
    for number in range(count):
        await streams[number % stream_count].publish(
            [NewEvent(name="happened", payload={"n": number})]
        )
    return count / (time.perf_counter() - started)


async def main() -> None:
    small: list[float] = []
    large: list[float] = []
    for _ in range(REPEATS):
        store = EventStore(InMemoryBackend())
        await single_event_rate(store, 1_000)
        small.append(await single_event_rate(store, 20_000))
    report("memory.publish.single.at_1k", median(small), "events/s", repeats=REPEATS)
    store = EventStore(InMemoryBackend())
    batch = [NewEvent(name="filler", payload={"n": n}) for n in range(1_000)]
    stream = store.stream(category="filler", stream="one")
    started = time.perf_counter()
    for _ in range(1_000):
        await stream.publish(batch)
    report("memory.publish.batch_1000", 1_000_000 / (time.perf_counter() - started), "events/s")
    for _ in range(REPEATS):
        large.append(await single_event_rate(store, 20_000))
    report("memory.publish.single.at_1m", median(large), "events/s", repeats=REPEATS)
    report("memory.publish.single.ratio_1m_to_1k", median(large) / median(small), "ratio")
    reads: list[float] = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        count = 0
        async for _event in store.category("bench").iterate(page_size=500):
            count += 1
        reads.append(count / (time.perf_counter() - started))
    report("memory.read.category", median(reads), "events/s", repeats=REPEATS)

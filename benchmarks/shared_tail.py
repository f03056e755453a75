"""Reads of one category by many groups on one node (the shared tail).

1 and 20 subscriber groups on one node follow one PostgreSQL category, each waiting for
wake-ups and polling every second. The figure is event reads per second (each one
round trip: the visibility watermark and the page, pipelined) while an event is
published every 50 ms, and while idle. With the shared tail they grow with the
categories followed, not with the groups.

Uses ``EVENTMILL_TEST_DSN`` and a throwaway schema (see ``benchmarks.consumers``).
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

from benchmarks.common import report
from benchmarks.consumers import postgres_backend
from eventmill.backends.postgres import PostgresBackend
from eventmill.consumers import EventSubscriptionConsumer, make_subscriber
from eventmill.events import CategoryIdentifier, NewEvent, StoredEvent
from eventmill.store import EventStore

SECONDS = 5.0
PUBLISH_EVERY = 0.05
POLL_INTERVAL = timedelta(seconds=1)


async def reads_per_second(backend: PostgresBackend, groups: int, *, publishing: bool) -> float:
    category = f"tail{groups}{'p' if publishing else 'i'}"
    identifier = CategoryIdentifier(category)
    seen = [0] * groups
    goal = [-1]
    all_seen = asyncio.Event()
    runners = []
    for number in range(groups):

        async def count(event: StoredEvent, number: int = number) -> None:
            seen[number] += 1
            if min(seen) == goal[0]:
                all_seen.set()

        subscriber = make_subscriber(
            backend, group=f"{category}-{number}", sources=identifier, processor=count
        )
        await subscriber.accept(identifier, 1)

        async def run(subscriber: EventSubscriptionConsumer = subscriber) -> None:
            while True:
                await subscriber.consume_all()
                await subscriber.wait_for_new_events(within=POLL_INTERVAL)

        runners.append(asyncio.create_task(run()))
    stream = EventStore(backend).stream(category=category, stream="one")
    await asyncio.sleep(1.5)  # first passes done
    reads = [0]
    read = backend.events.read

    async def counted(*args: Any, **kwargs: Any) -> list[StoredEvent]:
        reads[0] += 1
        return await read(*args, **kwargs)

    backend.events.read = counted  # type: ignore[method-assign]
    started = time.perf_counter()
    published = 0
    while time.perf_counter() - started < SECONDS:
        if publishing:
            await stream.publish([NewEvent(name="ping")])
            published += 1
        await asyncio.sleep(PUBLISH_EVERY)
    elapsed = time.perf_counter() - started
    del backend.events.read
    goal[0] = published
    if min(seen) < published:
        await asyncio.wait_for(all_seen.wait(), 30)
    for runner in runners:
        runner.cancel()
    await asyncio.gather(*runners, return_exceptions=True)
    return reads[0] / elapsed


async def main() -> None:
    async with postgres_backend() as backend:
        for publishing in (True, False):
            for groups in (1, 20):
                rate = await reads_per_second(backend, groups, publishing=publishing)
                state = "publishing_every_50ms" if publishing else "idle"
                report(f"postgres.shared_tail.{state}.groups_{groups}", rate, "reads/s")

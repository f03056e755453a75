"""Cost of one blocking publish on PostgreSQL (``BlockingEventStore``), beside an async
publish in a running loop and ``asyncio.run`` with a new backend per publish, measured
in the same run: median milliseconds per publish of one small event over ``REPEATS``
runs of ``PUBLISHES`` publishes each, and the ratios to the async publish.

Uses ``EVENTMILL_TEST_DSN`` and throwaway schemas, dropped at the end.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time

from benchmarks.common import median, report
from eventmill import BlockingEventStore, EventStore, NewEvent
from eventmill.backends.base import Backend
from eventmill.backends.postgres import PostgresBackend

REPEATS = 3
PUBLISHES = 200
NEW_LOOP_PUBLISHES = 20
DSN = os.environ.get("EVENTMILL_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def event() -> list[NewEvent]:
    return [NewEvent(name="order-placed", payload={"total": 10})]


async def async_publishes(schema: str) -> float:
    backend = await PostgresBackend.connect(DSN, schema=schema, max_size=2)
    try:
        stream = EventStore(backend).stream(category="bench", stream="async")
        started = time.perf_counter()
        for _ in range(PUBLISHES):
            await stream.publish(event())
        return (time.perf_counter() - started) / PUBLISHES
    finally:
        await backend.close()


def blocking_publishes(schema: str) -> float:
    async def make() -> Backend:
        return await PostgresBackend.connect(DSN, schema=schema, max_size=2)

    with BlockingEventStore.start(make) as store:
        started = time.perf_counter()
        for _ in range(PUBLISHES):
            store.publish("bench", "blocking", event())
        return (time.perf_counter() - started) / PUBLISHES


def new_loop_publishes(schema: str) -> float:
    async def once() -> None:
        backend = await PostgresBackend.connect(DSN, schema=schema, min_size=1, max_size=1)
        try:
            await EventStore(backend).stream(category="bench", stream="new-loop").publish(event())
        finally:
            await backend.close()

    started = time.perf_counter()
    for _ in range(NEW_LOOP_PUBLISHES):
        asyncio.run(once())
    return (time.perf_counter() - started) / NEW_LOOP_PUBLISHES


async def main() -> None:
    schema = f"eventmill_bench_{secrets.token_hex(4)}"
    backend = await PostgresBackend.connect(DSN, schema=schema, max_size=1)
    await backend.install_schema()
    try:
        runs: dict[str, list[float]] = {"async": [], "blocking": [], "new-loop": []}
        for _ in range(REPEATS):
            runs["async"].append(await async_publishes(schema))
            runs["blocking"].append(await asyncio.to_thread(blocking_publishes, schema))
            runs["new-loop"].append(await asyncio.to_thread(new_loop_publishes, schema))
        base = median(runs["async"])
        for kind, values in runs.items():
            value = median(values)
            report(
                f"publish one event, {kind}",
                value * 1000,
                "ms",
                ratio_to_async=round(value / base, 2),
                repeats=REPEATS,
            )
    finally:
        async with backend.connection() as connection:
            await connection.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await backend.close()

"""Where the time goes: cProfile of a PostgreSQL category read and of in-memory publishes.

- ``read``: 100,000 events of one category (payloads as in ``peers``) read through
  ``EventStore.category(...).iterate(page_size=500)``;
- ``publish``: 20,000 single-event publishes in memory, 100 streams in turn, each event
  made as in ``peers`` (``NewEvent`` with a two-key payload).

Prints, for each, the functions with the most time of their own (cProfile's
``tottime``) as JSON lines: share of the profiled total, seconds, calls. Uses only the
public API, so the same file profiles an older checkout too:
``PYTHONPATH=<checkout>/src:. python -m benchmarks.profiles`` (docs/performance.md
shows the code before and after). PostgreSQL: ``EVENTMILL_TEST_DSN`` in a throwaway
schema. cProfile adds its own cost per Python call, so the shares speak of where the
time goes, not of how long it takes unprofiled.
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import pstats
import secrets
from collections.abc import Awaitable, Callable

import psycopg
from psycopg import sql

from benchmarks.common import report
from eventmill import EventStore, NewEvent
from eventmill.backends.memory import InMemoryBackend
from eventmill.backends.postgres import PostgresBackend

DSN = os.environ.get("EVENTMILL_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")
READ_EVENTS = 100_000
PUBLISHES = 20_000
TOP = 12


def events(numbers: range) -> list[NewEvent]:
    return [NewEvent(name="happened", payload={"n": n, "note": "benchmark event"}) for n in numbers]


async def profiled(name: str, work: Callable[[], Awaitable[object]]) -> None:
    """Run ``work`` under cProfile and report its top functions by their own time."""
    profile = cProfile.Profile()
    profile.enable()
    await work()
    profile.disable()
    stats = pstats.Stats(profile)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)  # type: ignore[attr-defined]
    report(f"profiles.{name}.total", total, "s")
    for (path, line, function), (_, calls, own, _, _) in rows[:TOP]:
        where = f"{os.path.basename(path)}:{line}({function})" if line else function
        report(
            f"profiles.{name}",
            own / total,
            "share",
            seconds=round(own, 4),
            calls=calls,
            where=where,
        )


async def read() -> None:
    schema = f"em_bench_{secrets.token_hex(4)}"
    backend = await PostgresBackend.connect(DSN, schema=schema, min_size=2, max_size=4)
    try:
        await backend.install_schema()
        store = EventStore(backend)
        for batch in range(READ_EVENTS // 1_000):
            await store.stream(category="reads", stream=f"s{batch % 50}").publish(
                events(range(batch * 1_000, (batch + 1) * 1_000))
            )

        async def read_all() -> None:
            async for _event in store.category("reads").iterate(page_size=500):
                pass

        await read_all()  # warm: plans, prepared statements, the pool
        await profiled("read", read_all)
    finally:
        await backend.close()
        async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as connection:
            await connection.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
            )


async def publish() -> None:
    store = EventStore(InMemoryBackend())
    streams = [store.stream(category="writes", stream=f"s{n}") for n in range(100)]

    async def publish_all() -> None:
        for number in range(PUBLISHES):
            await streams[number % 100].publish(events(range(number, number + 1)))

    await profiled("publish", publish_all)


async def main() -> None:
    await read()
    await publish()


if __name__ == "__main__":
    asyncio.run(main())

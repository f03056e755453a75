"""How long publishes wait while a migration builds an index on a large events table:
migration 0004's partition index built concurrently (``eventmill migrate``, as shipped)
and, in the same run, the same index built the old way (``CREATE INDEX`` in the
migration's transaction). A publisher publishes one event every 20 ms throughout;
reported: build seconds and the longest publish wait during each build.

Not part of ``make bench`` (filling the table takes minutes): run
``python -m benchmarks.migration_index [EVENTS]`` (default 5,000,000). Uses a database
of its own on ``EVENTMILL_TEST_DSN``'s server, dropped at the end.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from benchmarks.common import report
from eventmill import EventStore, NewEvent
from eventmill.backends.postgres import PostgresBackend

TEST_DSN = os.environ.get("EVENTMILL_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")
INDEX = "events_category_bucket_sequence_number_idx"
FILL = """
INSERT INTO eventmill.events (sequence_number, name, category, stream, position, payload,
    metadata, occurred_at, stream_hash, transaction_id)
SELECT g, 'placed', 'c' || (g %% 10), 's' || (g %% 1000), g / 1000, '{"n": 1}', '{}', now(),
    g %% 1000, pg_current_xact_id()
FROM generate_series(1, %s) AS g
"""


async def forget_index(connection: psycopg.AsyncConnection[object]) -> None:
    await connection.execute(f"DROP INDEX IF EXISTS eventmill.{INDEX}")
    await connection.execute("DELETE FROM eventmill.schema_version WHERE version = 4")


async def publish_during(store: EventStore, build: asyncio.Task[object]) -> float:
    """Publish every 20 ms until ``build`` ends; return the longest publish wait."""
    longest = 0.0
    number = 0
    while not build.done():
        started = time.perf_counter()
        await store.stream(category="bench", stream=f"p-{number % 50}").publish(
            [NewEvent(name="placed", payload={"n": number})]
        )
        longest = max(longest, time.perf_counter() - started)
        number += 1
        await asyncio.sleep(0.02)
    await build
    return longest


async def old_build(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as connection:
        await connection.execute(
            f"CREATE INDEX {INDEX} ON eventmill.events (category, (stream_hash % 64),"
            " sequence_number)"
        )
        await connection.commit()


async def main(events: int = 5_000_000) -> None:
    name = f"em_bench_{secrets.token_hex(4)}"
    async with await psycopg.AsyncConnection.connect(TEST_DSN, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = urlunsplit(urlsplit(TEST_DSN)._replace(path=f"/{name}"))
    try:
        backend = await PostgresBackend.connect(dsn, schema="eventmill", max_size=3)
        try:
            await backend.install_schema()
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
                await c.execute(FILL, (events,))
                await c.execute("SELECT setval('eventmill.event_sequence_numbers', %s)", (events,))
                await c.execute("VACUUM ANALYZE eventmill.events")
                store = EventStore(backend)
                for label in ("concurrent", "in_transaction"):
                    await forget_index(c)
                    started = time.perf_counter()
                    build: asyncio.Task[object] = asyncio.create_task(
                        backend.install_schema() if label == "concurrent" else old_build(dsn)
                    )
                    longest = await publish_during(store, build)
                    seconds = time.perf_counter() - started
                    report(f"migration_index_{label}_build", seconds, "s", events=events)
                    report(
                        f"migration_index_{label}_longest_publish_wait",
                        longest * 1000,
                        "ms",
                        events=events,
                    )
        finally:
            await backend.close()
    finally:
        async with await psycopg.AsyncConnection.connect(TEST_DSN, autocommit=True) as admin:
            await admin.execute(
                sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name))
            )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5_000_000))

"""PostgreSQL append and read throughput, each figure beside a plain-psycopg floor
measured in the same run, and their ratio (eventmill / floor).

The floor is asyncio psycopg on an ``AsyncConnectionPool`` with no eventmill code, on a
table with the same columns and indexes: per publish one multi-row ``INSERT`` of the
same rows and its commit (``async with connection.transaction()``); per read one
``SELECT`` of the same rows, decoded to Python objects, paged the same way.

Each side's figure also gives its CPU per event: this process's (``client_cpu_us``,
``time.process_time``, median of the repeats) and, when the server runs on this
machine, its pool's server processes' (``server_cpu_us``, from ``/proc``, over all the
repeats together: it counts in 10 ms ticks per process). With 8 writers on a small
machine the two together bound the rate, so they show where eventmill stands against
the floor.

Uses ``EVENTMILL_TEST_DSN`` (default ``postgresql://postgres@127.0.0.1:5432/test``) and a
throwaway schema, dropped at the end. ``STORE_ONLY=publish.single.8`` runs only the
figures whose names start so.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from benchmarks.common import median, report
from eventmill.backends.postgres import PostgresBackend
from eventmill.events import NewEvent, stream_hash
from eventmill.store import EventStore

REPEATS = 3
SINGLE_PUBLISHES = 1_000
BATCHES = 60
BATCH_SIZE = 100
WRITERS = 8
READ_EVENTS = 30_000
PAGE_SIZE = 500
DSN = os.environ.get("EVENTMILL_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")
ONLY = os.environ.get("STORE_ONLY", "")

FLOOR_TABLE = """
CREATE TABLE {schema}.floor_events (
    sequence_number bigserial PRIMARY KEY,
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    name text NOT NULL,
    category text NOT NULL,
    stream text NOT NULL,
    position bigint NOT NULL,
    payload jsonb NOT NULL,
    metadata jsonb NOT NULL,
    occurred_at timestamptz NOT NULL,
    observed_at timestamptz NOT NULL DEFAULT now(),
    stream_hash bigint NOT NULL,
    transaction_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
    UNIQUE (category, stream, position)
);
CREATE INDEX ON {schema}.floor_events (category, sequence_number);
"""
FLOOR_INSERT_ROW = "(%s, %s, %s, %s, %s, %s, %s, %s)"
FLOOR_INSERT = (
    "INSERT INTO {schema}.floor_events"
    " (name, category, stream, position, payload, metadata, occurred_at, stream_hash) VALUES "
)
FLOOR_SELECT = (
    "SELECT sequence_number, id, name, category, stream, position, payload, metadata,"
    " occurred_at, observed_at FROM {schema}.floor_events"
    " WHERE category = %s AND sequence_number > %s ORDER BY sequence_number LIMIT %s"
)


def new_events(count: int, start: int = 0) -> list[NewEvent]:
    return [
        NewEvent(name="happened", payload={"n": number, "note": "benchmark event"})
        for number in range(start, start + count)
    ]


class Floor:
    """Plain psycopg doing the same writes and reads, positions counted in Python."""

    def __init__(self, pool: AsyncConnectionPool[Any], schema: str) -> None:
        self.pool = pool
        self.identifier = sql.Identifier(schema)
        self.positions: dict[tuple[str, str], int] = {}
        self.inserts: dict[int, sql.Composed] = {}
        self.select = sql.SQL(FLOOR_SELECT).format(schema=self.identifier)

    def _insert(self, count: int) -> sql.Composed:
        if count not in self.inserts:
            text = FLOOR_INSERT + ", ".join([FLOOR_INSERT_ROW] * count)
            self.inserts[count] = sql.SQL(text).format(schema=self.identifier)
        return self.inserts[count]

    async def publish(self, category: str, stream: str, events: list[NewEvent]) -> None:
        key = (category, stream)
        position = self.positions.get(key, -1)
        hashed = stream_hash(stream)
        parameters: list[object] = []
        for event in events:
            position += 1
            parameters += [
                event.name,
                category,
                stream,
                position,
                Jsonb(event.payload),
                Jsonb(event.metadata),
                event.occurred_at,
                hashed,
            ]
        async with self.pool.connection() as connection, connection.transaction():
            await connection.execute(self._insert(len(events)), parameters)
        self.positions[key] = position

    async def read_category(self, category: str) -> int:
        count = 0
        after = 0
        while True:
            async with self.pool.connection() as connection:
                cursor = await connection.execute(self.select, (category, after, PAGE_SIZE))
                rows = await cursor.fetchall()
            count += len(rows)
            if len(rows) < PAGE_SIZE:
                return count
            after = rows[-1][0]


async def server_processes(pool: AsyncConnectionPool[Any]) -> list[int]:
    """The server process ids of the pool's connections (all checked out at once)."""
    found: set[int] = set()
    release = asyncio.Event()

    async def hold() -> None:
        async with pool.connection() as connection:
            found.add(connection.pgconn.backend_pid)
            if len(found) == pool.max_size:
                release.set()
            await release.wait()

    await asyncio.gather(*(hold() for _ in range(pool.max_size)))
    return sorted(found)


def server_cpu(processes: list[int]) -> float | None:
    """CPU seconds used so far by these server processes, or None when the server is
    not on this machine (or not readable)."""
    ticks = 0
    for process in processes:
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


class Side:
    """One side of a comparison: its work, its server processes and its figures."""

    def __init__(self, work: Callable[[int], Awaitable[object]], processes: list[int]) -> None:
        self.work = work
        self.processes = processes
        self.rates: list[float] = []
        self.client_cpu: list[float] = []
        self.server_seconds = 0.0
        self.server_units = 0

    async def run(self, repeat: int, unit_count: int) -> None:
        server = server_cpu(self.processes)
        started, client = time.perf_counter(), time.process_time()
        await self.work(repeat)
        self.rates.append(unit_count / (time.perf_counter() - started))
        self.client_cpu.append((time.process_time() - client) / unit_count * 1e6)
        server_after = server_cpu(self.processes)
        if server is not None and server_after is not None:
            self.server_seconds += server_after - server
            self.server_units += unit_count

    def cpu(self) -> dict[str, float]:
        figures = {"client_cpu_us": round(median(self.client_cpu), 1)}
        if self.server_units:
            figures["server_cpu_us"] = round(self.server_seconds / self.server_units * 1e6, 1)
        return figures


async def compare(name: str, unit_count: int, mill: Side, floor: Side) -> None:
    """Run both REPEATS times, alternating which goes first; report medians and ratio."""
    if not name.startswith(ONLY):
        return
    for repeat in range(REPEATS):
        for side in (mill, floor) if repeat % 2 == 0 else (floor, mill):
            await side.run(repeat, unit_count)
    mill_rate, floor_rate = median(mill.rates), median(floor.rates)
    report(f"postgres.{name}", mill_rate, "events/s", repeats=REPEATS, **mill.cpu())
    report(f"postgres.{name}.floor", floor_rate, "events/s", repeats=REPEATS, **floor.cpu())
    report(f"postgres.{name}.ratio", mill_rate / floor_rate, "ratio")


async def main() -> None:
    schema = f"em_bench_{secrets.token_hex(4)}"
    backend = await PostgresBackend.connect(DSN, schema=schema, min_size=WRITERS, max_size=WRITERS)
    floor_pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        DSN, min_size=WRITERS, max_size=WRITERS, open=False
    )
    await floor_pool.open(wait=True)
    try:
        await backend.install_schema()
        async with backend.connection() as connection:
            await connection.execute(backend.sql(FLOOR_TABLE))
        store = EventStore(backend)
        floor = Floor(floor_pool, schema)
        processes = (await server_processes(backend.pool), await server_processes(floor_pool))
        await run_all(backend, store, floor, processes)
        async with backend.connection() as connection:
            await connection.execute(backend.sql("DROP SCHEMA {schema} CASCADE"))
    finally:
        await floor_pool.close()
        await backend.close()


async def run_all(
    backend: PostgresBackend, store: EventStore, floor: Floor, processes: tuple[list[int], ...]
) -> None:
    mill_processes, floor_processes = processes
    single = new_events(1)

    async def mill_single(repeat: int) -> None:
        for number in range(SINGLE_PUBLISHES):
            await store.stream(category="single", stream=f"r{repeat}-{number % 100}").publish(
                single
            )

    async def floor_single(repeat: int) -> None:
        for number in range(SINGLE_PUBLISHES):
            await floor.publish("single", f"r{repeat}-{number % 100}", single)

    await compare(
        "publish.single.1_writer",
        SINGLE_PUBLISHES,
        Side(mill_single, mill_processes),
        Side(floor_single, floor_processes),
    )

    per_writer = SINGLE_PUBLISHES // WRITERS

    async def mill_writers(repeat: int) -> None:
        async def writer(number: int) -> None:
            stream = store.stream(category="eight", stream=f"r{repeat}-w{number}")
            for _ in range(per_writer):
                await stream.publish(single)

        await asyncio.gather(*(writer(number) for number in range(WRITERS)))

    async def floor_writers(repeat: int) -> None:
        async def writer(number: int) -> None:
            for _ in range(per_writer):
                await floor.publish("eight", f"r{repeat}-w{number}", single)

        await asyncio.gather(*(writer(number) for number in range(WRITERS)))

    await compare(
        "publish.single.8_writers",
        per_writer * WRITERS,
        Side(mill_writers, mill_processes),
        Side(floor_writers, floor_processes),
    )

    batch = new_events(BATCH_SIZE)

    async def mill_batches(repeat: int) -> None:
        stream = store.stream(category="batches", stream=f"r{repeat}")
        for _ in range(BATCHES):
            await stream.publish(batch)

    async def floor_batches(repeat: int) -> None:
        for _ in range(BATCHES):
            await floor.publish("batches", f"r{repeat}", batch)

    await compare(
        "publish.batch_100.1_writer",
        BATCHES * BATCH_SIZE,
        Side(mill_batches, mill_processes),
        Side(floor_batches, floor_processes),
    )

    if not "read.category".startswith(ONLY):
        return
    filler = new_events(1_000)
    for number in range(READ_EVENTS // len(filler)):
        await store.stream(category="reads", stream=f"s{number}").publish(filler)
    async with backend.connection() as connection:
        await connection.execute(
            backend.sql(
                "INSERT INTO {schema}.floor_events SELECT sequence_number, id, name, category,"
                " stream, position, payload, metadata, occurred_at, observed_at, stream_hash,"
                " transaction_id FROM {schema}.events WHERE category = 'reads'"
            )
        )
        for table in ("events", "floor_events"):
            await connection.execute(backend.sql(f"VACUUM ANALYZE {{schema}}.{table}"))

    async def mill_reads(repeat: int) -> None:
        count = 0
        async for _event in store.category("reads").iterate(page_size=PAGE_SIZE):
            count += 1
        assert count == READ_EVENTS

    async def floor_reads(repeat: int) -> None:
        assert await floor.read_category("reads") == READ_EVENTS

    await compare(
        "read.category",
        READ_EVENTS,
        Side(mill_reads, mill_processes),
        Side(floor_reads, floor_processes),
    )

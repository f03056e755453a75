"""Where the time of one push delivery goes on PostgreSQL, beside a bare psycopg floor.

One event at a time is published to a category a push subscriber follows (as
``benchmarks.consumers.latency``), 0-10 ms apart (dense) and 10-250 ms apart (sparse).
Each delivery is timed at points along the chain, from the moment the event's
``sent`` time was taken (just before ``publish``):

- ``published``: ``publish`` returned;
- ``notified``: the listener read the notification (``WakeupRegistry.wake`` called);
- ``woken``: the subscriber's wake-up ran (its ``on_new_events`` callback);
- ``read_sent``: the storage read began (``PostgresEventStorage.read`` called);
- ``rows_back``: the read returned its events;
- ``processed``: the processor was called.

Printed as the median of each point (ms after ``sent``) and the p50/p99 of the total.
The floor is the same chain in bare psycopg: an autocommit INSERT into a one-table
schema with the NOTIFY pipelined after its commit, a LISTEN connection waited on with
``add_reader``, and one SELECT of the rows after the last one seen, on a third
connection.

``python -m benchmarks latency_chain``. ``LATENCY_SAMPLES`` (default 200) per gap
kind; ``LATENCY_ONLY=floor`` or ``=eventmill`` runs one side. Uses
``EVENTMILL_TEST_DSN`` and throwaway schemas, dropped at the end.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql

from benchmarks.common import report
from benchmarks.consumers import DENSE_GAPS, SPARSE_GAPS, percentile, postgres_backend
from eventmill.backends.postgres import PostgresBackend
from eventmill.consumers import make_subscriber
from eventmill.events import CategoryIdentifier, NewEvent, StoredEvent
from eventmill.store import EventStore

SAMPLES = int(os.environ.get("LATENCY_SAMPLES", "200"))
ONLY = os.environ.get("LATENCY_ONLY", "")
DSN = os.environ.get("EVENTMILL_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")
POLL = timedelta(seconds=1)
POINTS = ("published", "notified", "woken", "read_sent", "rows_back", "processed")


async def eventmill_chain(
    backend: PostgresBackend, gaps: tuple[float, float]
) -> list[dict[str, float]]:
    """One dict of point -> ms after ``sent`` per delivery (the first point of each kind)."""
    now = time.perf_counter
    marks: dict[str, float] = {}

    def mark(point: str) -> None:
        marks.setdefault(point, now())

    registry = backend.notifications.registry
    storage = backend.events
    wake: Callable[[str | None], None] = registry.wake
    read = storage.read

    def wake_marked(category: str | None) -> None:
        mark("notified")
        wake(category)

    async def read_marked(*args: Any, **kwargs: Any) -> list[StoredEvent]:
        mark("read_sent")
        page = await read(*args, **kwargs)
        if page:
            mark("rows_back")
        return page

    registry.wake = wake_marked  # type: ignore[method-assign]
    storage.read = read_marked  # type: ignore[method-assign]
    seen: asyncio.Queue[dict[str, float]] = asyncio.Queue()

    async def record(event: StoredEvent) -> None:
        mark("processed")
        sent = event.payload["sent"]
        assert isinstance(sent, float)
        await seen.put({point: (at - sent) * 1_000 for point, at in marks.items()})

    category = f"chain{secrets.token_hex(3)}"
    identifier = CategoryIdentifier(category)
    subscriber = make_subscriber(backend, group=category, sources=identifier, processor=record)
    subscriber.on_new_events(lambda: mark("woken"))
    await subscriber.accept(identifier, 1)

    async def run() -> None:
        while True:
            await subscriber.consume_all()
            await subscriber.wait_for_new_events(within=POLL)

    runner = asyncio.create_task(run())
    stream = EventStore(backend).stream(category=category, stream="one")
    chooser = random.Random(7)
    results: list[dict[str, float]] = []
    try:
        await stream.publish([NewEvent(name="warm-up", payload={"sent": now()})])
        await asyncio.wait_for(seen.get(), 10)
        for _ in range(SAMPLES):
            await asyncio.sleep(gaps[0] + chooser.random() * (gaps[1] - gaps[0]))
            marks.clear()
            await stream.publish([NewEvent(name="ping", payload={"sent": now()})])
            mark("published")
            results.append(await asyncio.wait_for(seen.get(), 10))
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await subscriber.withdraw_all()
        del registry.wake, storage.read
    return results


async def floor_chain(gaps: tuple[float, float]) -> list[dict[str, float]]:
    """The bare psycopg chain (see the module docstring)."""
    schema = f"em_bench_floor_{secrets.token_hex(4)}"
    channel = f"{schema}_events"
    table = sql.Identifier(schema, "events")
    connect = psycopg.AsyncConnection.connect
    publisher = await connect(DSN, autocommit=True)
    listener = await connect(DSN, autocommit=True)
    reader = await connect(DSN, autocommit=True)
    try:
        await publisher.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        await publisher.execute(
            sql.SQL("CREATE TABLE {} (id bigserial PRIMARY KEY, payload jsonb NOT NULL)").format(
                table
            )
        )
        await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        insert = sql.SQL("INSERT INTO {} (payload) VALUES (%s)").format(table)
        select = sql.SQL("SELECT id, payload FROM {} WHERE id > %s ORDER BY id").format(table)
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(listener.fileno(), readable.set)
        pgconn = listener.pgconn
        last = 0
        chooser = random.Random(7)
        results: list[dict[str, float]] = []
        for number in range(SAMPLES + 1):
            await asyncio.sleep(gaps[0] + chooser.random() * (gaps[1] - gaps[0]))
            sent = time.perf_counter()
            async with publisher.pipeline():
                await publisher.execute(insert, (psycopg.types.json.Jsonb({"sent": sent}),))
                await publisher.execute("SELECT pg_notify(%s, 'x')", (channel,), prepare=True)
            published = time.perf_counter()
            while pgconn.notifies() is None:
                await readable.wait()
                readable.clear()
                pgconn.consume_input()
            notified = time.perf_counter()
            cursor = await reader.execute(select, (last,), prepare=True)
            rows = await cursor.fetchall()
            processed = time.perf_counter()
            last = rows[-1][0]
            marks = {"published": published, "notified": notified, "processed": processed}
            if number:  # the first is a warm-up
                results.append({point: (at - sent) * 1_000 for point, at in marks.items()})
        loop.remove_reader(listener.fileno())
        return results
    finally:
        await publisher.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        for connection in (publisher, listener, reader):
            await connection.close()


def summary(name: str, deliveries: list[dict[str, float]]) -> None:
    totals = [delivery["processed"] for delivery in deliveries]
    points = {
        point: round(statistics.median(d[point] for d in deliveries if point in d), 3)
        for point in POINTS
        if any(point in d for d in deliveries)
    }
    report(f"{name}.p50", percentile(totals, 0.5), "ms", samples=len(totals), **points)
    report(f"{name}.p99", percentile(totals, 0.99), "ms")


async def main() -> None:
    for spacing, gaps in (("dense", DENSE_GAPS), ("sparse", SPARSE_GAPS)):
        if ONLY in ("", "floor"):
            summary(f"latency_chain.floor.{spacing}", await floor_chain(gaps))
        if ONLY in ("", "eventmill"):
            async with postgres_backend() as backend:
                assert isinstance(backend, PostgresBackend)
                summary(f"latency_chain.eventmill.{spacing}", await eventmill_chain(backend, gaps))

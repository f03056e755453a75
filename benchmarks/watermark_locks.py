"""Reads beside a big lock table: what the visibility watermark costs other work.

A private cluster (``tests.servers``, ``max_locks_per_transaction`` raised so that it can
hold them) gets 30,000 locks from other sessions: 4 sessions each hold 7,500
transaction-level advisory locks inside an open transaction, as lock-heavy applications
or partitioned tables do. Measured in one run, with and without those locks:

- ``watermark``: the time of one ``read_watermark()`` call (median of 200);
- ``tail_reads``: reads per second of 4 category readers reading their tails in a loop
  (each read: the watermark and a page of 100, pipelined) while a publisher adds an
  event every 20 ms; the figure is the ratio with / without the locks (goal >= 0.8);
- ``pgbench``: TPS of an unrelated ``pgbench`` (TPC-B-like, 2 clients, its own database
  ``em_pgbench``) with the locks held, without readers and with the 4 readers tailing
  as subscribers do (each reads every 10 ms: 400 reads/s together); the figure is the
  ratio with / without readers (goal >= 0.9). For comparison, the TPS with the 4
  readers reading streams at the same pace instead (the same page query without any
  watermark) shows what the reads cost without the watermark.

Each figure is the median of ``REPEATS`` rounds (a ratio: of the rounds' ratios).
``python -m benchmarks watermark_locks``.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import subprocess
import time
from typing import Any

import psycopg
from tests.servers import PG_BIN, PrivateCluster

from benchmarks.common import report
from eventmill.backends.postgres import PostgresBackend
from eventmill.events import (
    CategoryIdentifier,
    EventSourceIdentifier,
    NewEvent,
    StreamIdentifier,
)
from eventmill.store import EventStore

HOLDERS = 4
LOCKS_PER_HOLDER = 7_500
READERS = 4
REPEATS = 5
SECONDS = 4.0
PACED_READ_EVERY = 0.01
PUBLISH_EVERY = 0.02
PGBENCH_CLIENTS = 2
LOCK_CLASS = 7  # advisory keys (7, n): nothing else uses this class


async def hold_locks(dsn: str) -> list[psycopg.AsyncConnection[Any]]:
    """HOLDERS sessions holding LOCKS_PER_HOLDER advisory locks each, in open
    transactions, until their connections close."""
    holders = []
    for number in range(HOLDERS):
        connection = await psycopg.AsyncConnection.connect(dsn)
        first = number * LOCKS_PER_HOLDER
        await connection.execute(
            "SELECT count(pg_advisory_xact_lock(%s::int, n))"
            " FROM generate_series(%s::int, %s::int) AS n",
            (LOCK_CLASS, first, first + LOCKS_PER_HOLDER - 1),
        )
        holders.append(connection)
    return holders


async def watermark_ms(backend: PostgresBackend) -> float:
    times = []
    async with backend.connection() as connection:
        for _ in range(200):
            started = time.perf_counter()
            await connection.execute(backend.sql("SELECT {schema}.read_watermark()"))
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


async def tail_reads(
    backend: PostgresBackend, *, pace: float | None, seconds: float, streams: bool = False
) -> float:
    """Reads per second of READERS tailing readers over ``seconds``; with ``pace``, each
    reads at most once per ``pace`` seconds. With ``streams``, they read streams (the
    same page query, without the watermark) instead of categories."""
    reads = [0]
    stop = asyncio.Event()

    async def tail(number: int) -> None:
        source: EventSourceIdentifier = (
            StreamIdentifier(f"tail{number}", "s")
            if streams
            else CategoryIdentifier(f"tail{number}")
        )
        after: int | None = None
        while not stop.is_set():
            started = time.perf_counter()
            events = await backend.events.read(source, after=after, limit=100)
            if events:
                last = events[-1]
                after = last.position if streams else last.sequence_number
            reads[0] += 1
            if pace is not None:
                await asyncio.sleep(max(0.0, pace - (time.perf_counter() - started)))

    tasks = [asyncio.create_task(tail(number)) for number in range(READERS)]
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    return reads[0] / (time.perf_counter() - started)


async def publish_until(backend: PostgresBackend, stop: asyncio.Event) -> None:
    store = EventStore(backend)
    number = 0
    while not stop.is_set():
        await store.stream(category=f"tail{number % READERS}", stream="s").publish(
            [NewEvent(name="ping")]
        )
        number += 1
        await asyncio.sleep(PUBLISH_EVERY)


async def tail_rate(backend: PostgresBackend) -> float:
    stop = asyncio.Event()
    publisher = asyncio.create_task(publish_until(backend, stop))
    try:
        return await tail_reads(backend, pace=None, seconds=SECONDS)
    finally:
        stop.set()
        await publisher


def pgbench(cluster: PrivateCluster, *arguments: str) -> str:
    """Run pgbench on ``em_pgbench`` of ``cluster``; its output. Blocks."""
    command = [str(PG_BIN / "pgbench"), "-h", "127.0.0.1", "-p", str(cluster.port)]
    done = subprocess.run(
        [*command, "-U", "postgres", *arguments, "em_pgbench"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def pgbench_tps(cluster: PrivateCluster) -> float:
    output = pgbench(cluster, "-n", "-c", str(PGBENCH_CLIENTS), "-T", str(int(SECONDS)))
    found = re.search(r"tps = ([0-9.]+)", output)
    assert found is not None, output
    return float(found.group(1))


async def pgbench_with_readers(
    cluster: PrivateCluster, backend: PostgresBackend, *, streams: bool
) -> float:
    task = asyncio.create_task(
        tail_reads(backend, pace=PACED_READ_EVERY, seconds=SECONDS + 1, streams=streams)
    )
    try:
        return await asyncio.to_thread(pgbench_tps, cluster)
    finally:
        await task


async def measure_round(cluster: PrivateCluster, backend: PostgresBackend) -> dict[str, float]:
    """One round of every figure, without and with the locks held."""
    figures: dict[str, float] = {}
    for locked in (False, True):
        holders = await hold_locks(cluster.dsn()) if locked else []
        try:
            state = "locked" if locked else "unlocked"
            figures[f"watermark.{state}"] = await watermark_ms(backend)
            figures[f"tail_reads.{state}"] = await tail_rate(backend)
            if locked:
                figures["pgbench.alone"] = await asyncio.to_thread(pgbench_tps, cluster)
                figures["pgbench.readers"] = await pgbench_with_readers(
                    cluster, backend, streams=False
                )
                figures["pgbench.stream_readers"] = await pgbench_with_readers(
                    cluster, backend, streams=True
                )
        finally:
            for holder in holders:
                await holder.close()
    figures["tail_reads.ratio"] = figures["tail_reads.locked"] / figures["tail_reads.unlocked"]
    figures["pgbench.ratio"] = figures["pgbench.readers"] / figures["pgbench.alone"]
    return figures


UNITS = {"watermark": "ms", "tail_reads": "reads/s", "pgbench": "tps"}
GOALS = {"tail_reads.ratio": 0.8, "pgbench.ratio": 0.9}


async def main() -> None:
    cluster = await asyncio.to_thread(
        PrivateCluster.create, {"max_locks_per_transaction": "1024", "max_connections": "40"}
    )
    try:
        async with await psycopg.AsyncConnection.connect(cluster.dsn(), autocommit=True) as admin:
            await admin.execute("CREATE DATABASE em_pgbench")
            await asyncio.to_thread(pgbench, cluster, "-i", "-q", "-s", "2")
            backend = await PostgresBackend.connect(
                cluster.dsn(), schema="em_watermark", max_size=READERS + 2
            )
            try:
                await backend.install_schema()
                rounds = [await measure_round(cluster, backend) for _ in range(REPEATS)]
            finally:
                await backend.close()
            await admin.execute("DROP DATABASE em_pgbench")
        for name in rounds[0]:
            values = [figures[name] for figures in rounds]
            unit = "x" if name.endswith("ratio") else UNITS[name.split(".")[0]]
            details: dict[str, object] = {"rounds": [round(value, 3) for value in values]}
            if name in GOALS:
                details["goal"] = GOALS[name]
            report(f"postgres.watermark_locks.{name}", statistics.median(values), unit, **details)
    finally:
        await asyncio.to_thread(cluster.remove)

"""Consumption through the consumer pipeline, and publish-to-processor latency.

For each backend (in memory, PostgreSQL):

- ``drain.checkpoint_100``: a 100,000-event category drained by an EventSourceConsumer
  with a trivial processor, saving every 100 events; as events/s and as a ratio to a
  plain category read (EventSource pages of 500) measured in the same run. Also the
  backend statements per event: reads plus checkpoint saves, each one SQL statement on
  PostgreSQL, counted at the storage ports. And the floor of its checkpoint commits:
  as many saves as the drain makes (``DRAIN_EVENTS / 100``), one at a time through the
  same ``EventConsumerStateStore.save`` (one UPDATE, one commit each), measured beside
  it: saves stay one at a time (each carries the version of the one before) and at
  most one batch is processed ahead of a save in flight (the replay bound), so a drain
  cannot take less time than these commits. Reported as seconds, with the drain's and
  the read's seconds, and as ``ratio_allowed_by_commits``: the read's time over the
  floor's (the best drain-to-read ratio the commits leave). Read, drain and floor also
  report ``cpu_s``, the client's CPU (``time.process_time``) for each.
- ``drain.checkpoint_100.bare_psycopg`` (PostgreSQL): the same drain and read with
  psycopg alone, nothing of eventmill's, in the same run, schema and events: pages of
  500 read one page ahead on one connection, rows as tuples (JSON left as text), no
  watermark; with saves, an autocommit ``UPDATE ... WHERE version = v`` of the
  group's checkpoint row every 100 rows on a second connection, one in flight while
  the next rows are handled, as eventmill's consumer saves. Reported as the bare
  drain's and read's seconds and client CPU and ``bare_psycopg_ratio`` (bare read over
  bare drain): what this save discipline allows on this machine at all.
- ``drain.checkpoint_1``: the same over 10,000 events, saving after every event.
- ``latency.push`` / ``latency.poll``: publish-to-processor time, p50 and p99, for a
  subscriber that waits for wake-ups (push) or only polls every second (poll), one event
  at a time, publishes 0-10 ms apart (dense) and 10-250 ms apart (sparse); and the CPU
  an idle push subscriber uses (share of one core).

Medians of 3 runs (ratios: the median of each run's ratio). ``CONSUMERS_ONLY=drain``
runs the checkpoint-100 drain (with its read, floor and bare psycopg runs) alone,
``CONSUMERS_ONLY=latency`` the push latencies alone. PostgreSQL: ``EVENTMILL_TEST_DSN``
(default ``postgresql://postgres@127.0.0.1:5432/test``), in a throwaway schema whose
events table is analyzed once filled (autovacuum would analyze it within a minute
anyway; without statistics the bare reads, which set no planner options, took 4.5 s).
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, NamedTuple

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from benchmarks.common import median, report
from eventmill.backends.base import Backend
from eventmill.backends.memory import InMemoryBackend
from eventmill.backends.postgres import PostgresBackend
from eventmill.consumers import (
    ConsumerSettings,
    EventConsumerStateStore,
    EventProcessor,
    EventSourceConsumer,
    make_subscriber,
)
from eventmill.events import CategoryIdentifier, NewEvent, StoredEvent, source_key
from eventmill.sources import EventSource
from eventmill.store import EventStore

REPEATS = 3
DRAIN_EVENTS = 100_000
EAGER_EVENTS = 10_000
PUSH_SAMPLES = 200
POLL_SAMPLES = 10
POLL_INTERVAL = timedelta(seconds=1)
IDLE_SECONDS = 10.0
DENSE_GAPS = (0.0, 0.01)
SPARSE_GAPS = (0.01, 0.25)
ONLY = os.environ.get("CONSUMERS_ONLY", "")
DSN = os.environ.get("EVENTMILL_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")
BENCH = CategoryIdentifier("bench")


class Nothing(EventProcessor):
    async def process_event(self, event: StoredEvent) -> None:
        return None


class Counting:
    """Counts calls of the storage methods that each cost one statement on PostgreSQL
    (by shadowing them on the instances; ``stop()`` removes the shadows). A drain's
    pages are read by ``EventStorage.pages``: in memory through ``read``, on PostgreSQL
    through its private ``_execute``, which every read (one round trip) goes through."""

    def __init__(self, backend: Backend) -> None:
        self.calls = 0
        read = "_execute" if isinstance(backend, PostgresBackend) else "read"
        self.targets = ((backend.events, read), (backend.checkpoints, "save"))
        for target, name in self.targets:
            original: Callable[..., Any] = getattr(target, name)
            setattr(target, name, self._counted(original))

    def stop(self) -> None:
        for target, name in self.targets:
            delattr(target, name)

    def _counted(self, original: Callable[..., Any]) -> Callable[..., Any]:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await original(*args, **kwargs)

        return counted


@asynccontextmanager
async def postgres_backend() -> AsyncIterator[PostgresBackend]:
    schema = f"em_bench_{secrets.token_hex(4)}"
    backend = await PostgresBackend.connect(DSN, schema=schema, min_size=1, max_size=4)
    try:
        await backend.install_schema()
        yield backend
    finally:
        await backend.close()
        async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as connection:
            await connection.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
            )


@asynccontextmanager
async def memory_backend() -> AsyncIterator[InMemoryBackend]:
    yield InMemoryBackend()


async def fill(backend: Backend, category: str, count: int) -> None:
    store = EventStore(backend)
    for batch in range(count // 1_000):
        await store.stream(category=category, stream=f"s{batch % 50}").publish(
            [NewEvent(name="happened", payload={"n": n}) for n in range(1_000)]
        )


class Timing(NamedTuple):
    """A workload's wall-clock seconds and the client's CPU seconds (this process)."""

    seconds: float
    cpu: float


class Stopwatch:
    """Times a ``with`` block: ``took`` is its Timing once the block is done."""

    took = Timing(0.0, 0.0)

    def __enter__(self) -> Stopwatch:
        self._cpu, self._started = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *_: object) -> None:
        self.took = Timing(time.perf_counter() - self._started, time.process_time() - self._cpu)


async def read_all(backend: Backend, identifier: CategoryIdentifier) -> Timing:
    with Stopwatch() as watch:
        async for _event in EventSource(backend, identifier).iterate():
            pass
    return watch.took


async def commit_floor(backend: Backend, group: str, saves: int) -> Timing:
    """``saves`` checkpoint saves one after the other, as a drain's are."""
    state = EventConsumerStateStore(backend.checkpoints, group, BENCH)
    await state.save(None)  # the first save inserts the row; the drain's later ones update
    with Stopwatch() as watch:
        for place in range(1, saves + 1):
            await state.save(place)
    return watch.took


async def drain(
    backend: Backend, identifier: CategoryIdentifier, group: str, every: int
) -> tuple[Timing, int]:
    """Drain ``identifier`` from the start; the timing and the number of events."""
    consumer = EventSourceConsumer(
        EventSource(backend, identifier),
        Nothing(),
        EventConsumerStateStore(backend.checkpoints, group, identifier),
        settings=ConsumerSettings(checkpoint_every=every),
    )
    with Stopwatch() as watch:
        count = await consumer.consume_all()
    return watch.took, count


async def bare_drain(backend: PostgresBackend, group: str | None) -> Timing:
    """The drain (with ``group``: saving every 100 rows) or read of ``BENCH`` with
    psycopg alone (see the module docstring); raises AssertionError if a save changed
    no row or the rows are not all there."""
    schema = sql.Identifier(backend.schema)
    read = (
        sql.SQL(
            "SELECT sequence_number, id, name, stream, position, payload::text, metadata::text,"
            " occurred_at, observed_at FROM {}.events WHERE category = %s"
            " AND sequence_number > %s ORDER BY sequence_number LIMIT 500"
        )
        .format(schema)
        .as_bytes(None)
    )
    save = (
        sql.SQL(
            "UPDATE {}.checkpoints SET after_place = %s, version = %s"
            " WHERE group_name = %s AND source_key = %s AND version = %s"
        )
        .format(schema)
        .as_bytes(None)
    )
    key = source_key(BENCH)
    async with (
        await psycopg.AsyncConnection.connect(DSN, autocommit=True) as reader,
        await psycopg.AsyncConnection.connect(DSN, autocommit=True) as saver,
    ):
        if group is not None:
            await saver.execute(
                sql.SQL(
                    "INSERT INTO {}.checkpoints"
                    " (group_name, source_key, source, after_place, version, epoch)"
                    " VALUES (%s, %s, %s, NULL, 1, 0)"
                ).format(schema),
                (group, key, Jsonb(BENCH.to_json())),
            )

        async def page(after: int) -> list[tuple[Any, ...]]:
            cursor = await reader.execute(read, (BENCH.category, after), prepare=False)
            return await cursor.fetchall()

        async def saved(place: int, version: int) -> None:
            cursor = await saver.execute(save, (place, version + 1, group, key, version))
            assert cursor.rowcount == 1

        rows, unsaved, version = 0, 0, 1
        saving: asyncio.Task[None] | None = None
        with Stopwatch() as watch:
            ahead = asyncio.create_task(page(0))
            while rows_of_page := await ahead:
                ahead = asyncio.create_task(page(rows_of_page[-1][0]))
                for row in rows_of_page:
                    rows += 1
                    unsaved += 1
                    if group is not None and unsaved == 100:
                        if saving is not None:
                            await saving
                        saving = asyncio.create_task(saved(row[0], version))
                        version += 1
                        unsaved = 0
                        await asyncio.sleep(0)  # the UPDATE goes out now, as eventmill's
            if saving is not None:
                await saving
        assert rows == DRAIN_EVENTS, rows
    return watch.took


async def latency(
    backend: Backend, *, push: bool, samples: int, gaps: tuple[float, float]
) -> list[float]:
    """Publish one event at a time, ``gaps`` (min, max seconds, uniform) apart; the time
    until the processor sees each, in ms. A first delivery, not counted, warms up the
    connections (their first statements are planned and the SQL functions compiled: it
    took 2.6-3.3 ms against 1.2-1.5 for the slowest of the next 39 on a quiet machine,
    so with 40 samples it alone made the p99)."""
    seen: asyncio.Queue[float] = asyncio.Queue()

    async def record(event: StoredEvent) -> None:
        sent = event.payload["sent"]
        assert isinstance(sent, float)
        await seen.put((time.perf_counter() - sent) * 1_000)

    category = f"latency{secrets.token_hex(3)}"
    identifier = CategoryIdentifier(category)
    subscriber = make_subscriber(backend, group=category, sources=identifier, processor=record)
    await subscriber.accept(identifier, 1)

    async def run() -> None:
        while True:
            await subscriber.consume_all()
            if push:
                await subscriber.wait_for_new_events(within=POLL_INTERVAL)
            else:
                await asyncio.sleep(POLL_INTERVAL.total_seconds())

    runner = asyncio.create_task(run())
    stream = EventStore(backend).stream(category=category, stream="one")
    chooser = random.Random(7)
    results: list[float] = []
    try:
        for sample in range(-1, samples):
            await asyncio.sleep(gaps[0] + chooser.random() * (gaps[1] - gaps[0]))
            await stream.publish([NewEvent(name="ping", payload={"sent": time.perf_counter()})])
            took = await asyncio.wait_for(seen.get(), 10)
            if sample >= 0:
                results.append(took)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await subscriber.withdraw_all()
    return results


async def idle_cpu(backend: Backend) -> float:
    """The share of one core an idle push subscriber uses over ``IDLE_SECONDS``, with
    only that subscriber's task and the backend's own (pool, listener) running: raises
    RuntimeError if a task of an earlier workload is still alive."""
    leftovers = [
        task.get_name()
        for task in asyncio.all_tasks()
        if task is not asyncio.current_task() and _workload_task(task)
    ]
    if leftovers:
        raise RuntimeError(f"earlier workloads still run: {leftovers}")
    identifier = CategoryIdentifier(f"idle{secrets.token_hex(3)}")
    subscriber = make_subscriber(backend, group="idle", sources=identifier, processor=Nothing())
    await subscriber.accept(identifier, 1)

    async def run() -> None:
        while True:
            await subscriber.consume_all()
            await subscriber.wait_for_new_events(within=POLL_INTERVAL)

    runner = asyncio.create_task(run())
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.sleep(IDLE_SECONDS)
    share = (time.process_time() - cpu) / (time.perf_counter() - wall)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    await subscriber.withdraw_all()
    return share


def _workload_task(task: asyncio.Task[Any]) -> bool:
    """Whether ``task`` is none of the backend's own (its pool's workers and scheduler
    with the scheduler's wait, its LISTEN task)."""
    name = task.get_name()
    own = name.startswith(("pool-", "eventmill-listen-"))
    return not own and getattr(task.get_coro(), "__qualname__", "") != "Event.wait"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def measure(kind: str, backend: Backend) -> None:
    if ONLY == "latency":
        await measure_push_latency(kind, backend)
        return
    await fill(backend, "bench", DRAIN_EVENTS)
    if isinstance(backend, PostgresBackend):
        async with backend.connection() as connection:
            await connection.execute(
                sql.SQL("ANALYZE {}.events").format(sql.Identifier(backend.schema))
            )
    reads: list[Timing] = []
    drains: list[Timing] = []
    floors: list[Timing] = []
    bare_reads: list[Timing] = []
    bare_drains: list[Timing] = []
    statements: list[float] = []
    for repeat in range(REPEATS):
        reads.append(await read_all(backend, BENCH))
        floors.append(await commit_floor(backend, f"floor-{repeat}", DRAIN_EVENTS // 100))
        counter = Counting(backend)
        took, count = await drain(backend, BENCH, f"drain-{repeat}", 100)
        drains.append(took)
        statements.append(counter.calls / count)
        counter.stop()
        if isinstance(backend, PostgresBackend):
            bare_reads.append(await bare_drain(backend, None))
            bare_drains.append(await bare_drain(backend, f"bare-{repeat}"))
    cpu = {"cpu_s": round(median([t.cpu for t in reads]), 3)}
    rate = [DRAIN_EVENTS / t.seconds for t in reads]
    report(f"{kind}.consumers.read.category", median(rate), "events/s", repeats=REPEATS, **cpu)
    cpu = {"cpu_s": round(median([t.cpu for t in drains]), 3)}
    rate = [DRAIN_EVENTS / t.seconds for t in drains]
    report(f"{kind}.consumers.drain.checkpoint_100", median(rate), "events/s", **cpu)
    ratios = [read.seconds / took.seconds for took, read in zip(drains, reads, strict=True)]
    report(f"{kind}.consumers.drain.checkpoint_100.ratio_to_read", median(ratios), "ratio")
    report(f"{kind}.consumers.drain.checkpoint_100.statements", median(statements), "per event")
    report(
        f"{kind}.consumers.drain.checkpoint_100.commit_floor",
        median([t.seconds for t in floors]),
        "s",
        commits=DRAIN_EVENTS // 100,
        cpu_s=round(median([t.cpu for t in floors]), 3),
        drain_s=round(median([t.seconds for t in drains]), 3),
        read_s=round(median([t.seconds for t in reads]), 3),
    )
    allowed = [read.seconds / floor.seconds for read, floor in zip(reads, floors, strict=True)]
    report(
        f"{kind}.consumers.drain.checkpoint_100.ratio_allowed_by_commits", median(allowed), "ratio"
    )
    if bare_drains:
        report(
            f"{kind}.consumers.drain.checkpoint_100.bare_psycopg",
            median([t.seconds for t in bare_drains]),
            "s",
            cpu_s=round(median([t.cpu for t in bare_drains]), 3),
            read_s=round(median([t.seconds for t in bare_reads]), 3),
            read_cpu_s=round(median([t.cpu for t in bare_reads]), 3),
        )
        ratios = [r.seconds / d.seconds for r, d in zip(bare_reads, bare_drains, strict=True)]
        report(f"{kind}.consumers.drain.checkpoint_100.bare_psycopg_ratio", median(ratios), "ratio")
    if ONLY == "drain":
        return
    await fill(backend, "eager", EAGER_EVENTS)
    eager = []
    for repeat in range(REPEATS):
        took, count = await drain(backend, CategoryIdentifier("eager"), f"eager-{repeat}", 1)
        eager.append(count / took.seconds)
    report(f"{kind}.consumers.drain.checkpoint_1", median(eager), "events/s", repeats=REPEATS)
    await measure_push_latency(kind, backend)
    polled = await latency(backend, push=False, samples=POLL_SAMPLES, gaps=(0.0, 1.0))
    report(f"{kind}.consumers.latency.poll_1s.p50", percentile(polled, 0.5), "ms")
    report(f"{kind}.consumers.latency.poll_1s.p99", percentile(polled, 0.99), "ms")
    report(f"{kind}.consumers.idle_cpu", await idle_cpu(backend) * 100, "% of a core")


async def measure_push_latency(kind: str, backend: Backend) -> None:
    for spacing, gaps in (("dense", DENSE_GAPS), ("sparse", SPARSE_GAPS)):
        pushed = await latency(backend, push=True, samples=PUSH_SAMPLES, gaps=gaps)
        report(f"{kind}.consumers.latency.push.{spacing}.p50", percentile(pushed, 0.5), "ms")
        report(f"{kind}.consumers.latency.push.{spacing}.p99", percentile(pushed, 0.99), "ms")


async def main() -> None:
    async with memory_backend() as memory:
        await measure("memory", memory)
    async with postgres_backend() as postgres:
        await measure("postgres", postgres)

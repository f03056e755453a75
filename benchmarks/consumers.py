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
  floor's (the best drain-to-read ratio the commits leave).
- ``drain.checkpoint_1``: the same over 10,000 events, saving after every event.
- ``latency.push`` / ``latency.poll``: publish-to-processor time, p50 and p99, for a
  subscriber that waits for wake-ups (push) or only polls every second (poll), one event
  at a time, publishes 0-10 ms apart (dense) and 10-250 ms apart (sparse); and the CPU
  an idle push subscriber uses (share of one core).

Medians of 3 runs. ``CONSUMERS_ONLY=drain`` runs the checkpoint-100 drain (with its read
and floor) alone. PostgreSQL: ``EVENTMILL_TEST_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/test``), in a throwaway schema.
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
from typing import Any

import psycopg
from psycopg import sql

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
from eventmill.events import CategoryIdentifier, NewEvent, StoredEvent
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
    (by shadowing them on the instances; ``stop()`` removes the shadows)."""

    def __init__(self, backend: Backend) -> None:
        self.calls = 0
        self.targets = ((backend.events, "read"), (backend.checkpoints, "save"))
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


async def read_rate(backend: Backend, identifier: CategoryIdentifier) -> float:
    started = time.perf_counter()
    count = 0
    async for _event in EventSource(backend, identifier).iterate():
        count += 1
    return count / (time.perf_counter() - started)


async def commit_floor(backend: Backend, group: str, saves: int) -> float:
    """Seconds ``saves`` checkpoint saves take one after the other, as a drain's are."""
    state = EventConsumerStateStore(backend.checkpoints, group, BENCH)
    await state.save(None)  # the first save inserts the row; the drain's later ones update
    started = time.perf_counter()
    for place in range(1, saves + 1):
        await state.save(place)
    return time.perf_counter() - started


async def drain_rate(
    backend: Backend, identifier: CategoryIdentifier, group: str, every: int
) -> tuple[float, int]:
    consumer = EventSourceConsumer(
        EventSource(backend, identifier),
        Nothing(),
        EventConsumerStateStore(backend.checkpoints, group, identifier),
        settings=ConsumerSettings(checkpoint_every=every),
    )
    started = time.perf_counter()
    count = await consumer.consume_all()
    return count / (time.perf_counter() - started), count


async def latency(
    backend: Backend, *, push: bool, samples: int, gaps: tuple[float, float]
) -> list[float]:
    """Publish one event at a time, ``gaps`` (min, max seconds, uniform) apart; the time
    until the processor sees each, in ms."""
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
        for _ in range(samples):
            await asyncio.sleep(gaps[0] + chooser.random() * (gaps[1] - gaps[0]))
            await stream.publish([NewEvent(name="ping", payload={"sent": time.perf_counter()})])
            results.append(await asyncio.wait_for(seen.get(), 10))
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
    await fill(backend, "bench", DRAIN_EVENTS)
    reads: list[float] = []
    drains: list[float] = []
    floors: list[float] = []
    statements: list[float] = []
    for repeat in range(REPEATS):
        reads.append(await read_rate(backend, BENCH))
        floors.append(await commit_floor(backend, f"floor-{repeat}", DRAIN_EVENTS // 100))
        counter = Counting(backend)
        rate, count = await drain_rate(backend, BENCH, f"drain-{repeat}", 100)
        drains.append(rate)
        statements.append(counter.calls / count)
        counter.stop()
    report(f"{kind}.consumers.read.category", median(reads), "events/s", repeats=REPEATS)
    report(f"{kind}.consumers.drain.checkpoint_100", median(drains), "events/s", repeats=REPEATS)
    ratios = [drain / read for drain, read in zip(drains, reads, strict=True)]
    report(f"{kind}.consumers.drain.checkpoint_100.ratio_to_read", median(ratios), "ratio")
    report(f"{kind}.consumers.drain.checkpoint_100.statements", median(statements), "per event")
    report(
        f"{kind}.consumers.drain.checkpoint_100.commit_floor",
        median(floors),
        "s",
        commits=DRAIN_EVENTS // 100,
        drain_s=round(DRAIN_EVENTS / median(drains), 3),
        read_s=round(DRAIN_EVENTS / median(reads), 3),
    )
    allowed = [DRAIN_EVENTS / read / floor for read, floor in zip(reads, floors, strict=True)]
    report(
        f"{kind}.consumers.drain.checkpoint_100.ratio_allowed_by_commits", median(allowed), "ratio"
    )
    if ONLY == "drain":
        return
    await fill(backend, "eager", EAGER_EVENTS)
    eager = [
        (await drain_rate(backend, CategoryIdentifier("eager"), f"eager-{repeat}", 1))[0]
        for repeat in range(REPEATS)
    ]
    report(f"{kind}.consumers.drain.checkpoint_1", median(eager), "events/s", repeats=REPEATS)
    for spacing, gaps in (("dense", DENSE_GAPS), ("sparse", SPARSE_GAPS)):
        pushed = await latency(backend, push=True, samples=PUSH_SAMPLES, gaps=gaps)
        report(f"{kind}.consumers.latency.push.{spacing}.p50", percentile(pushed, 0.5), "ms")
        report(f"{kind}.consumers.latency.push.{spacing}.p99", percentile(pushed, 0.99), "ms")
    polled = await latency(backend, push=False, samples=POLL_SAMPLES, gaps=(0.0, 1.0))
    report(f"{kind}.consumers.latency.poll_1s.p50", percentile(polled, 0.5), "ms")
    report(f"{kind}.consumers.latency.poll_1s.p99", percentile(polled, 0.99), "ms")
    report(f"{kind}.consumers.idle_cpu", await idle_cpu(backend) * 100, "% of a core")


async def main() -> None:
    async with memory_backend() as memory:
        await measure("memory", memory)
    async with postgres_backend() as postgres:
        await measure("postgres", postgres)

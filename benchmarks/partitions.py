"""Partitioned consumption: one group sharing a category among 1, 2 and 4 instances.

A category of 200 streams (32 events each, 6,400 events) on PostgreSQL is consumed by
a group asking for it in 16 partitions, with an I/O-bound processor (an awaited 2 ms
sleep per event). Each instance is a separate process running a
DistributedEventBroker and one subscriber. For each instance count (a group of its
own over the same events) the instances are started and the allocation settles
(every instance holds its 16 / n partitions) before they are told to go; the time runs
from "go" until every partition's checkpoint reached its last event.

Figures: ``partitions.throughput`` (events/s) per instance count, and
``partitions.speedup`` for 2 and 4 instances as the ratio to one instance in the same
run (goal: at least 1.8 and 3.2). ``balance_bound`` is the best ratio the actual
allocation allows: all events over the events of the busiest instance (streams do not
split evenly over 16 partitions).

``python -m benchmarks partitions``. PostgreSQL: ``EVENTMILL_TEST_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/test``), in a throwaway schema.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
from collections import Counter
from datetime import timedelta

from psycopg import sql

from benchmarks.common import report
from eventmill.backends.postgres import PostgresBackend
from eventmill.broker.distributed import DistributedEventBroker, DistributedEventBrokerSettings
from eventmill.consumers import make_subscriber
from eventmill.events import CategoryIdentifier, CategoryPartitionIdentifier, NewEvent, StoredEvent
from eventmill.store import EventStore

DSN = os.environ.get("EVENTMILL_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")
CATEGORY = CategoryIdentifier("bench")
STREAMS = 200
EVENTS_PER_STREAM = 32
PARTITIONS = 16
WORK = 0.002  # seconds awaited per event
INSTANCES = (1, 2, 4)
DEADLINE = 120.0
FAST = DistributedEventBrokerSettings(
    subscriber_manager_heartbeat_interval=timedelta(milliseconds=200),
    coordinator_distribution_interval=timedelta(milliseconds=100),
    observer_synchronisation_interval=timedelta(milliseconds=100),
)


async def work(event: StoredEvent) -> None:
    """The I/O-bound processor: an awaited 2 ms call."""
    await asyncio.sleep(WORK)


async def read_line() -> str:
    line: str = await asyncio.to_thread(sys.stdin.readline)
    return line.strip()


async def worker(schema: str, group: str, id: str, instances: int) -> None:
    """One instance: register, report ``ready`` once holding its share, consume after
    ``go`` until ``stop``, then leave gracefully."""
    backend = await PostgresBackend.connect(DSN, schema=schema, min_size=1, max_size=3)
    subscriber = make_subscriber(
        backend, group=group, id=id, sources=CATEGORY, processor=work, partitions=PARTITIONS
    )
    broker = DistributedEventBroker(backend, node_id=id, settings=FAST)
    running = asyncio.create_task(broker.execute())
    try:
        await broker.register(subscriber)
        async with asyncio.timeout(DEADLINE):
            while len(subscriber.sources) != PARTITIONS // instances:
                await broker.wait_ready()
        print("ready", flush=True)
        assert await read_line() == "go"

        async def consume() -> None:
            while True:
                if not await subscriber.consume_all():
                    await subscriber.wait_for_new_events(timedelta(milliseconds=50))

        consuming = asyncio.create_task(consume())
        assert await read_line() == "stop"
        consuming.cancel()
        await broker.unregister(subscriber)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await backend.close()


async def run_group(backend: PostgresBackend, group: str, instances: int) -> tuple[float, float]:
    """Events/s for ``instances`` worker processes, and the balance bound."""
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.partitions",
            backend.schema,
            group,
            f"{group}-{number}",
            str(instances),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for number in range(instances)
    ]
    try:
        async with asyncio.timeout(DEADLINE):
            for process in workers:
                assert process.stdout is not None
                assert (await process.stdout.readline()).strip() == b"ready"
        holdings = await backend.subscriptions.list(group=group)
        holders = Counter(h.subscriber_id for h in holdings)
        assert (
            len(holdings) == PARTITIONS
            and sorted(holders.values()) == [PARTITIONS // instances] * instances
        ), holdings
        latest = {
            source: await backend.events.latest(source)
            for source in (
                CategoryPartitionIdentifier(CATEGORY.category, n, PARTITIONS)
                for n in range(PARTITIONS)
            )
        }
        load: Counter[str | None] = Counter()  # events per holder
        for holding in holdings:
            partition = holding.source
            assert isinstance(partition, CategoryPartitionIdentifier)
            streams = sum(partition.contains(f"stream-{n}") for n in range(STREAMS))
            load[holding.subscriber_id] += streams * EVENTS_PER_STREAM
        started = time.monotonic()
        for process in workers:
            assert process.stdin is not None
            process.stdin.write(b"go\n")
            await process.stdin.drain()
        async with asyncio.timeout(DEADLINE):
            while True:
                done = {c.source: c.after for c in await backend.checkpoints.list(group)}
                if all(
                    event is not None and (done.get(source) or 0) >= event.sequence_number
                    for source, event in latest.items()
                ):
                    break
                await asyncio.sleep(0.005)
        elapsed = time.monotonic() - started
        for process in workers:
            assert process.stdin is not None
            process.stdin.write(b"stop\n")
            await process.stdin.drain()
        async with asyncio.timeout(DEADLINE):
            for process in workers:
                assert await process.wait() == 0
    finally:
        for process in workers:
            if process.returncode is None:
                process.kill()
                await process.wait()
    total = STREAMS * EVENTS_PER_STREAM
    return total / elapsed, total / max(load.values())


async def main() -> None:
    schema = f"em_bench_{secrets.token_hex(6)}"
    backend = await PostgresBackend.connect(DSN, schema=schema, min_size=1, max_size=2)
    try:
        await backend.install_schema()
        store = EventStore(backend)
        for _ in range(EVENTS_PER_STREAM // 4):
            for stream in range(STREAMS):
                await store.stream(category=CATEGORY.category, stream=f"stream-{stream}").publish(
                    [NewEvent(name="happened") for _ in range(4)]
                )
        single = 0.0
        for instances in INSTANCES:
            rate, bound = await run_group(backend, f"bench-{instances}", instances)
            single = single or rate
            report(
                "partitions.throughput",
                rate,
                "events/s",
                instances=instances,
                partitions=PARTITIONS,
                work_ms=WORK * 1000,
            )
            if instances > 1:
                report(
                    "partitions.speedup",
                    rate / single,
                    "ratio",
                    instances=instances,
                    balance_bound=round(bound, 2),
                )
    finally:
        async with backend.connection() as connection:
            await connection.execute(
                sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema))
            )
        await backend.close()


if __name__ == "__main__":
    asyncio.run(worker(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))

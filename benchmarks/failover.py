"""Failover on PostgreSQL with node processes (NodeSet): the time from stopping a node
to every source it held being processed again by another node, measured with the
database clock (the stop's time against the first event each moved source's new
holder processed; a probe publishes into every partition every 25 ms, so figures are
within about that).

- graceful stop (SIGTERM) with the default settings (goal: under 1 s);
- SIGKILL with the default settings (goal: under 10 s; the budget is max age +
  distribution + synchronisation intervals, 6 s);
- SIGKILL with fast settings (0.5 s heartbeat, 1.5 s max age; goal: under 2 s).

Two nodes hold 3 groups x 4 partitions; after each measurement a new node replaces
the stopped one. Medians of ``REPEATS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import TypeVar

from tests.harness.node_process import GroupConfig
from tests.harness.nodes import Node, NodeSet

from benchmarks.common import median, report
from eventmill.backends.base import HoldingState
from eventmill.backends.postgres import PostgresBackend
from eventmill.broker.distributed import DistributedEventBrokerSettings
from eventmill.events import NewEvent, source_key, stream_hash
from eventmill.store import EventStore

T = TypeVar("T")
DSN = os.environ.get("EVENTMILL_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REPEATS = 3
PARTITIONS = 4
GROUPS = [GroupConfig(group=f"f{n}", category="probe", partitions=PARTITIONS) for n in range(3)]
PROBE_EVERY = 0.025
FAST = DistributedEventBrokerSettings(
    subscriber_manager_heartbeat_interval=timedelta(milliseconds=500),
    subscriber_manager_purge_interval=timedelta(seconds=1),
    subscriber_manager_subscriber_max_age=timedelta(milliseconds=1500),
    coordinator_distribution_interval=timedelta(milliseconds=100),
    observer_synchronisation_interval=timedelta(milliseconds=100),
)


def probe_streams() -> list[str]:
    """One stream name in each partition."""
    streams: dict[int, str] = {}
    number = 0
    while len(streams) < PARTITIONS:
        name = f"probe-{number}"
        streams.setdefault(stream_hash(name) % PARTITIONS, name)
        number += 1
    return list(streams.values())


@asynccontextmanager
async def probing(backend: PostgresBackend) -> AsyncIterator[None]:
    """Publish one event into every partition every PROBE_EVERY seconds."""
    store = EventStore(backend)
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            for stream in probe_streams():
                await store.stream(category="probe", stream=stream).publish(
                    [NewEvent(name="probe", payload={})]
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROBE_EVERY):
                    await stop.wait()

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        stop.set()
        await task


async def held_by(backend: PostgresBackend, node: Node) -> set[tuple[str, str]]:
    return {
        (h.group, source_key(h.source))
        for h in await backend.subscriptions.list(node_id=node.node_id)
        if h.state is HoldingState.ASSIGNED
    }


async def poll(check: Callable[[], Awaitable[T | None]], within: float = 60.0) -> T:
    """Await ``check()`` until it returns a value other than None; return that value.
    Raises TimeoutError after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {within}s")
        await asyncio.sleep(0.02)


async def both_hold(backend: PostgresBackend, running: list[Node]) -> bool | None:
    """True once each running node holds its share (half of the sources), else None."""
    share = len(GROUPS) * PARTITIONS // 2
    for node in running:
        if len(await held_by(backend, node)) != share:
            return None
    return True


async def resumed_after(
    backend: PostgresBackend, victim: Node, moved: set[tuple[str, str]], since: datetime
) -> float | None:
    """Seconds from ``since`` to the latest first event processed elsewhere among the
    ``moved`` sources, or None while one of them has not been processed yet."""
    async with backend.connection() as connection:
        cursor = await connection.execute(
            backend.sql(
                "SELECT group_name, source_key, min(at) FROM {schema}.processed"
                " WHERE node_id <> %s AND at > %s GROUP BY 1, 2"
            ),
            (victim.node_id, since),
        )
        firsts = {(group, key): at for group, key, at in await cursor.fetchall()}
    if not moved <= set(firsts):
        return None
    return max(float((firsts[source] - since).total_seconds()) for source in moved)


async def measure(settings: DistributedEventBrokerSettings, *, kill: bool) -> list[float]:
    schema = f"em_bench_{secrets.token_hex(4)}"
    backend = await PostgresBackend.connect(DSN, schema=schema, min_size=1, max_size=3)
    figures = []
    try:
        await backend.install_schema()
        async with (
            NodeSet(backend, groups=GROUPS, settings=settings, checkpoint_every=1) as nodes,
            probing(backend),
        ):
            running = [await nodes.start(), await nodes.start()]
            for _ in range(REPEATS):
                await poll(lambda: both_hold(backend, running))
                victim = running.pop(0)
                moved = await held_by(backend, victim)
                async with backend.connection() as connection:
                    cursor = await connection.execute("SELECT clock_timestamp()")
                    row = await cursor.fetchone()
                assert row is not None
                since: datetime = row[0]
                stopping = None
                if kill:
                    await nodes.kill(victim)
                else:
                    stopping = asyncio.create_task(nodes.stop(victim))
                figures.append(
                    await poll(lambda: resumed_after(backend, victim, moved, since))  # noqa: B023
                )
                if stopping is not None:
                    assert await stopping == 0
                running.append(await nodes.start())
    finally:
        async with backend.connection() as connection:
            await connection.execute(backend.sql("DROP SCHEMA {schema} CASCADE"))
        await backend.close()
    return figures


async def main() -> None:
    for name, settings, kill in (
        ("graceful_stop.default", DistributedEventBrokerSettings(), False),
        ("sigkill.default", DistributedEventBrokerSettings(), True),
        ("sigkill.fast", FAST, True),
    ):
        runs = await measure(settings, kill=kill)
        report(
            f"failover.{name}",
            median(runs),
            "s",
            repeats=REPEATS,
            runs=[round(run, 3) for run in runs],
        )

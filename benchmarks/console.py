"""The console's read on PostgreSQL for 50 groups and 500 sources: database time of one
refresh (``read_cluster`` with the previous read, as the console's refresher does it),
and of the first read, which counts every lag from scratch.

100,000 events in 5 categories of 200 streams; each group holds 8 partitions of one
category and 2 of its streams (10 sources), on 3 nodes. Every fifth group lags: its
partitions have processed nothing (20,000 events behind per group, 200,000 in all) and
its streams are 10 events behind; the others are caught up. Median of ``REPEATS``
refreshes (each one also makes every 60th source's full recount).
"""

from __future__ import annotations

import os
import secrets
import statistics
from datetime import timedelta

from benchmarks.common import report
from eventmill.backends.base import Assign
from eventmill.backends.postgres import PostgresBackend
from eventmill.console.cluster import ClusterState, ConsoleSettings, read_cluster
from eventmill.events import (
    CategoryPartitionIdentifier,
    EventSourceIdentifier,
    NewEvent,
    StreamIdentifier,
)
from eventmill.store import EventStore

DSN = os.environ.get("EVENTMILL_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")
GROUPS = 50
CATEGORIES = 5
STREAMS = 200
EVENTS_PER_STREAM = 100
NODES = 3
REPEATS = 20


def group_sources(group: int) -> list[EventSourceIdentifier]:
    category = f"c{group % CATEGORIES}"
    sources: list[EventSourceIdentifier] = [
        CategoryPartitionIdentifier(category, partition, 8) for partition in range(8)
    ]
    sources += [StreamIdentifier(category, f"s{n}") for n in (group, group + 1)]
    return sources


async def fill(backend: PostgresBackend) -> None:
    store = EventStore(backend)
    for category in range(CATEGORIES):
        for stream in range(STREAMS):
            await store.stream(category=f"c{category}", stream=f"s{stream}").publish(
                [NewEvent(name="e", payload={"n": n}) for n in range(EVENTS_PER_STREAM)]
            )
    changes = []
    for group in range(GROUPS):
        name = f"g{group:02}"
        lagging = group % 5 == 0
        for index, source in enumerate(group_sources(group)):
            holder = f"node-{index % NODES}"
            latest = await backend.events.latest(source)
            assert latest is not None
            after: int | None
            if isinstance(source, StreamIdentifier):
                after = latest.position - (10 if lagging else 0)
            else:
                after = None if lagging else latest.sequence_number
            await backend.checkpoints.save(name, source, after, expected_version=None)
            changes.append(
                Assign(
                    group=name,
                    source=source,
                    subscriber_id=f"{name}@{holder}",
                    node_id=holder,
                    epoch=1,
                )
            )
        for node in range(NODES):
            await backend.subscribers.register(name, f"{name}@node-{node}", f"node-{node}", [])
    await backend.subscriptions.apply(changes)


async def main() -> None:
    schema = f"em_bench_{secrets.token_hex(4)}"
    backend = await PostgresBackend.connect(DSN, schema=schema, min_size=1, max_size=4)
    try:
        await backend.install_schema()
        await fill(backend)
        async with backend.connection() as connection:
            await connection.execute(backend.sql("ANALYZE {schema}.events"))
        settings = ConsoleSettings(subscriber_max_age=timedelta(hours=1))
        first = await read_cluster(backend, settings)
        previous: ClusterState | None = first
        times = []
        for _ in range(REPEATS):
            state = await read_cluster(backend, settings, previous)
            times.append(state.database_seconds)
            previous = state
        sources = sum(len(group["sources"]) for group in state.groups)
        lag = sum(group["lag"] for group in state.groups)
        assert len(state.groups) == GROUPS and sources == GROUPS * 10
        report(
            "console_refresh.postgres.50_groups_500_sources",
            statistics.median(times) * 1000,
            "ms",
            goal="< 200 ms of database time per refresh",
            events=CATEGORIES * STREAMS * EVENTS_PER_STREAM,
            lag_events=lag,
            repeats=REPEATS,
        )
        report(
            "console_first_read.postgres.50_groups_500_sources",
            first.database_seconds * 1000,
            "ms",
            note="counts every lag from scratch; later reads count what changed",
            lag_events=lag,
        )
    finally:
        async with backend.connection() as connection:
            await connection.execute(backend.sql("DROP SCHEMA {schema} CASCADE"))
        await backend.close()

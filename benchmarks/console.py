"""The console's read on PostgreSQL for 50 groups and 500 sources: database time of one
refresh (``read_cluster`` with the previous read, as the console's refresher does it),
and of the first read, which counts every lag from scratch.

On a private cluster (``tests.servers``) with ``pg_stat_statements``: the database
time of a refresh is the server's planning and execution time of its statements; the
wall time is what ``read_cluster`` waited on the storage (round trips and decoding
too). Both are medians; the statements' own shares follow (mean per refresh).

100,000 events in 5 categories of 200 streams; each group holds 8 partitions of one
category and 2 of its streams (10 sources), on 3 nodes. Every fifth group lags: its
partitions have processed nothing (20,000 events behind per group, 200,000 in all) and
its streams are 10 events behind; the others are caught up. Median of ``REPEATS``
refreshes (each one also makes every 60th source's full recount).
"""

from __future__ import annotations

import secrets
import statistics
from datetime import timedelta
from typing import Any

import psycopg
from tests.servers import PrivateCluster

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


STATEMENTS = """
SELECT query, calls, total_exec_time + total_plan_time FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND query NOT LIKE '%pg_stat_statements%'
"""


async def server_milliseconds(monitor: psycopg.AsyncConnection[Any]) -> dict[str, float]:
    """Server time (planning and execution, ms) per statement text since the last
    reset, then reset."""
    cursor = await monitor.execute(STATEMENTS)
    found = {str(query): float(ms) for query, _calls, ms in await cursor.fetchall()}
    await monitor.execute("SELECT pg_stat_statements_reset()")
    return found


async def main() -> None:
    cluster = PrivateCluster.create(
        {
            "shared_preload_libraries": "pg_stat_statements",
            "pg_stat_statements.track": "all",
            "pg_stat_statements.track_planning": "on",
        }
    )
    try:
        await measure(cluster.dsn())
    finally:
        cluster.remove()


async def measure(dsn: str) -> None:
    schema = f"em_bench_{secrets.token_hex(4)}"
    backend = await PostgresBackend.connect(dsn, schema=schema, min_size=1, max_size=4)
    monitor = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        await monitor.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await backend.install_schema()
        await fill(backend)
        async with backend.connection() as connection:
            await connection.execute(backend.sql("ANALYZE {schema}.events"))
        settings = ConsoleSettings(subscriber_max_age=timedelta(hours=1))
        await server_milliseconds(monitor)
        first = await read_cluster(backend, settings)
        first_server = sum((await server_milliseconds(monitor)).values())
        previous: ClusterState | None = first
        walls, servers = [], []
        by_statement: dict[str, list[float]] = {}
        for _ in range(REPEATS):
            state = await read_cluster(backend, settings, previous)
            found = await server_milliseconds(monitor)
            walls.append(state.database_seconds * 1000)
            servers.append(sum(found.values()))
            for query, ms in found.items():
                by_statement.setdefault(" ".join(query.split())[:60], []).append(ms)
            previous = state
        sources = sum(len(group["sources"]) for group in state.groups)
        lag = sum(group["lag"] for group in state.groups)
        assert len(state.groups) == GROUPS and sources == GROUPS * 10
        details = {
            "events": CATEGORIES * STREAMS * EVENTS_PER_STREAM,
            "lag_events": lag,
            "repeats": REPEATS,
        }
        report(
            "console_refresh.postgres.50_groups_500_sources.database",
            statistics.median(servers),
            "ms",
            goal="< 200 ms of database time per refresh",
            note="server time: planning and execution of the refresh's statements "
            "(pg_stat_statements), median",
            **details,
        )
        report(
            "console_refresh.postgres.50_groups_500_sources.wall",
            statistics.median(walls),
            "ms",
            note="waiting on the storage: round trips, server time and decoding, median",
            **details,
        )
        for statement, values in sorted(by_statement.items(), key=lambda item: -sum(item[1])):
            report(
                "console_refresh.postgres.statement",
                sum(values) / REPEATS,
                "ms",
                statement=statement,
            )
        report(
            "console_first_read.postgres.50_groups_500_sources.database",
            first_server,
            "ms",
            note="counts every lag from scratch; later reads count what changed",
            lag_events=lag,
        )
        report(
            "console_first_read.postgres.50_groups_500_sources.wall",
            first.database_seconds * 1000,
            "ms",
            lag_events=lag,
        )
    finally:
        await monitor.close()
        await backend.close()

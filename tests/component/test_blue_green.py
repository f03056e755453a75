"""Blue/green rebuild of a versioned projection on PostgreSQL, with two nodes.

Node A runs version 1 of ``summary`` (events per stream) and a reactor group
(``mailer``, one row per event in ``sent``); node B, the "new code", runs version 2
(events and amount per stream: a changed fold). While events keep being published and
a reader polls the read alias (``alias_schema``), version 2 builds from the start and
takes over once caught up. The reader sees version 1's results, then version 2's, never
an error, an empty or a partial table; version 1's group and schema are gone after the
grace period; the reactor handled each event once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta

import pytest
from psycopg import sql

from eventmill import EventProcessingNode, NewEvent, NodeSettings, StorageError
from eventmill.backends.base import ConsumerTransaction, VersionState
from eventmill.backends.postgres import PostgresBackend
from eventmill.backends.postgres.projection_versions import alias_schema, version_schema
from eventmill.broker.distributed import DistributedEventBrokerSettings
from eventmill.consumers.processors import TransactionalEventProcessor
from eventmill.events import CategoryIdentifier, StoredEvent
from eventmill.rebuilds import projection_status
from eventmill.store import EventStore
from tests.postgres_support import TEST_DSN, drop_schema, unique_schema_name

pytestmark = pytest.mark.postgres

STREAMS = 50
FIRST = 5_000  # events before version 2 starts
MORE = 1_000  # events published while it builds
LAG_BOUND = 200  # how far version 2 may be behind version 1 when it takes over
ORDERS = CategoryIdentifier("orders")
SETTINGS = NodeSettings(
    poll_interval=timedelta(milliseconds=200),
    checkpoint_interval=200,
    shutdown_timeout=timedelta(seconds=5),
    broker_settings=DistributedEventBrokerSettings(
        subscriber_manager_heartbeat_interval=timedelta(milliseconds=200),
        subscriber_manager_purge_interval=timedelta(milliseconds=500),
        subscriber_manager_subscriber_max_age=timedelta(milliseconds=1500),
        coordinator_distribution_interval=timedelta(milliseconds=100),
        observer_synchronisation_interval=timedelta(milliseconds=100),
    ),
)


class Summary(TransactionalEventProcessor):
    """Per stream: ``events`` and a ``total``, which version 1 folds as the number of
    events and version 2 as the sum of their amounts (a changed fold)."""

    def __init__(self, schema: str, version: int) -> None:
        self.version = version
        table = sql.SQL("{}.totals").format(sql.Identifier(schema))
        self.create = sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            " stream text PRIMARY KEY, events bigint NOT NULL, total bigint NOT NULL)"
        ).format(table)
        self.add = sql.SQL(
            "INSERT INTO {} AS t VALUES (%s, %s, %s) ON CONFLICT (stream) DO UPDATE"
            " SET events = t.events + excluded.events, total = t.total + excluded.total"
        ).format(table)

    async def setup(self, transaction: ConsumerTransaction) -> None:
        assert transaction.connection is not None  # PostgreSQL
        await transaction.connection.execute(self.create)

    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        sums: dict[str, list[int]] = {}
        for event in events:
            amount = event.payload["amount"]
            assert isinstance(amount, int)
            total = sums.setdefault(event.stream, [0, 0])
            total[0] += 1
            total[1] += 1 if self.version == 1 else amount
        assert transaction.connection is not None  # PostgreSQL
        async with transaction.connection.cursor() as cursor:
            await cursor.executemany(
                self.add, [(stream, n, total) for stream, (n, total) in sorted(sums.items())]
            )


class Mailer(TransactionalEventProcessor):
    """A reactor: one ``sent`` row per event (its primary key refuses a second)."""

    def __init__(self, backend: PostgresBackend) -> None:
        self.insert = backend.sql("INSERT INTO {schema}.sent VALUES (%s)")

    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        assert transaction.connection is not None  # PostgreSQL
        async with transaction.connection.cursor() as cursor:
            await cursor.executemany(self.insert, [(event.id,) for event in events])


@pytest.fixture
async def backend() -> AsyncIterator[PostgresBackend]:
    schema = unique_schema_name()
    backend = await PostgresBackend.connect(TEST_DSN, schema=schema, max_size=6)
    try:
        await backend.install_schema()
        async with backend.connection() as connection:
            await connection.execute(
                backend.sql("CREATE TABLE {schema}.sent (id text PRIMARY KEY)")
            )
        yield backend
    finally:
        await backend.close()
        await drop_schema(alias_schema(backend, "summary"))
        for version in (1, 2):
            await drop_schema(version_schema(backend, "summary", version))
        await drop_schema(schema)


async def wait_for(condition: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def node(backend: PostgresBackend, node_id: str, version: int) -> EventProcessingNode:
    made = EventProcessingNode(backend, node_id=node_id, settings=SETTINGS)
    summary = Summary(version_schema(backend, "summary", version), version)
    made.register_projection(
        name="summary",
        version=version,
        source=ORDERS,
        processor=summary,
        setup=summary.setup,
        partitions=8,
        retire_grace=timedelta(seconds=1),
        check_interval=timedelta(milliseconds=100),
    )
    if version == 1:
        made.register_subscriber(group="mailer", source=ORDERS, processor=Mailer(backend))
    return made


async def test_version_2_rebuilds_while_version_1_serves_then_takes_over(
    backend: PostgresBackend,
) -> None:
    store = EventStore(backend)
    published = 0

    async def publish(count: int, per_stream: int, pause: float = 0.0) -> None:
        """``count`` events, ``per_stream`` to each stream per publish."""
        nonlocal published
        for _ in range(count // (STREAMS * per_stream)):
            for stream in range(STREAMS):
                await store.stream(category="orders", stream=f"o-{stream}").publish(
                    [
                        NewEvent(name="placed", payload={"amount": (published + n) % 5 + 1})
                        for n in range(per_stream)
                    ]
                )
                published += per_stream
            await asyncio.sleep(pause)

    alias = sql.Identifier(alias_schema(backend, "summary"))
    read = sql.SQL("SELECT stream, events, total FROM {}.totals").format(alias)

    async def serving() -> tuple[int, int, int]:
        """(the version by its fold, rows, summed events) read through the alias; the
        reader's connection prepares the query, as psycopg does after 5 executions."""
        async with backend.connection() as connection:
            rows = await (await connection.execute(read)).fetchall()
        version = 1 if all(events == total for _, events, total in rows) else 2
        return (version, len(rows), sum(row[1] for row in rows))

    async def served() -> tuple[int, int, int] | None:
        try:
            return await serving()
        except StorageError:
            return None

    await publish(FIRST, per_stream=FIRST // STREAMS)
    node_a = node(backend, "a", 1)
    observations: list[tuple[int, int, int]] = []
    failures: list[str] = []

    async def poll() -> None:
        """Record (version, rows, summed events) of every read."""
        while True:
            try:
                observations.append(await serving())
            except Exception as error:
                failures.append(repr(error))
            await asyncio.sleep(0.02)

    async with node_a:

        async def v1_complete() -> bool:
            found = await served()
            return found is not None and found[2] == FIRST

        await wait_for(v1_complete, 60, "version 1 to serve every event")
        reader = asyncio.create_task(poll())
        publishing = asyncio.create_task(publish(MORE, per_stream=2, pause=0.05))
        node_b = node(backend, "b", 2)
        async with node_b:

            async def v1_retired() -> bool:
                states = {
                    r.version: r.state
                    for r in await backend.projection_versions.versions("summary")
                }
                return states == {1: VersionState.RETIRED, 2: VersionState.SERVING}

            await wait_for(v1_retired, 60, "version 2 to serve and version 1 to retire")
            await publishing

            async def v2_complete() -> bool:
                found = await served()
                return found is not None and found[2] == FIRST + MORE

            await wait_for(v2_complete, 60, "version 2 to catch up")
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            assert [h.group for h in node_a.subscribers] == ["mailer"]  # v1 stopped itself

            async def mailer_done() -> bool:
                async with backend.connection() as connection:
                    cursor = await connection.execute(
                        backend.sql("SELECT count(*) FROM {schema}.sent")
                    )
                    row = await cursor.fetchone()
                return row is not None and row[0] == published

            await wait_for(mailer_done, 60, "the reactor")

    assert failures[:3] == []
    versions = [version for version, _, _ in observations]
    assert versions[0] == 1 and versions[-1] == 2
    switch = versions.index(2)
    assert set(versions[:switch]) == {1} and set(versions[switch:]) == {2}, "went back"
    # Never less than what version 1 had before the rebuild began, and tables only grow.
    assert all(rows == STREAMS and events >= FIRST for _, rows, events in observations)
    for version in (1, 2):
        counts = [events for seen, _, events in observations if seen == version]
        assert counts == sorted(counts), f"version {version} shrank"
    # Version 2 took over within the cutover lag (100) plus what was published while
    # the switch committed (up to a burst of 100) of where version 1 stood.
    last_v1, first_v2 = observations[switch - 1][2], observations[switch][2]
    assert first_v2 >= last_v1 - LAG_BOUND, (last_v1, first_v2)
    shown = {(p["group"], p["state"]) for p in await projection_status(backend)}
    assert shown == {("summary-v1", "retired"), ("summary-v2", "serving")}
    groups = {summary.group for summary in await backend.groups.overview(max_age=timedelta(0))}
    assert "summary-v1" not in groups and {"summary-v2", "mailer"} <= groups
    async with backend.connection() as connection:
        cursor = await connection.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s ORDER BY nspname",
            (f"{backend.schema}\\_\\_%",),
        )
        left = [row[0] for row in await cursor.fetchall()]
    assert left == [alias_schema(backend, "summary"), version_schema(backend, "summary", 2)]

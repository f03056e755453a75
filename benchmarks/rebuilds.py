"""Blue/green rebuilds of a versioned projection on PostgreSQL (``make bench``).

200,000 events in 50 streams. Version 1 of a per-stream totals projection is built and
serves; then versions 2, 3 and 4 are rebuilt in turn, each by a new node registering
it, while the previous version serves a reader polling the read alias every 20 ms and
one event per 20 ms keeps being published. Reported, medians of the three rebuilds:

- ``rebuild.events_per_s``: events a version built, divided by the time from its
  node's start to its cutover (everything included: node start, allocation, the
  batches, the keeper's cutover; the cutover comes within the default 100 events of
  the end);
- ``rebuild.ratio_to_drain``: that rate over the plain drain measured just before each
  rebuild in the same run (an EventSourceConsumer with a processor doing nothing,
  checkpoint every 100, as ``consumers.drain.checkpoint_100``), median of the ratios;
- ``rebuild.ratio_to_projection_drain``: the same over a drain by an
  EventSourceConsumer running the same projection processor with the same batches
  (what the node, the broker and the version upkeep cost on top of the projection's
  own writes);
- ``rebuild.first_batch_s``: from the node's start to the first batch's checkpoint
  (schema check, the version's declaration and setup, the leader's next allocation
  round, which a node cannot hasten on another node, then the first 1,000 events): a
  fixed cost, reported apart;
- ``rebuild.batches_events_per_s`` and ``rebuild.batches_ratio_to_drain``: the events
  after the first batch over the time from its checkpoint to the cutover.

200,000 events, not 50,000: a real rebuild has a long log, and with 50,000 the fixed
start-up cost (about 0.3 s) was a third of the whole. The rebuild runs with
``checkpoint_interval=1000`` (its transactional batches: read, upsert, checkpoint,
commit per 1,000 events); with 100 it makes five round trips per 100 events, against
about one for the plain drain.
- ``rebuild.reader_failures``: reads through the alias that failed or saw an empty or
  partial table, over every rebuild (must be 0), and ``rebuild.reads``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import NamedTuple

import psycopg
from psycopg import sql

from benchmarks.common import median, report
from benchmarks.consumers import DSN, Nothing
from eventmill import EventProcessingNode, NewEvent, NodeSettings
from eventmill.backends.base import ConsumerTransaction, VersionState
from eventmill.backends.postgres import PostgresBackend
from eventmill.backends.postgres.projection_versions import alias_schema, version_schema
from eventmill.consumers import (
    ConsumerSettings,
    EventConsumerStateStore,
    EventSourceConsumer,
    TransactionalEventProcessor,
)
from eventmill.events import CategoryIdentifier, StoredEvent
from eventmill.sources import EventSource
from eventmill.store import EventStore

EVENTS = 200_000
BATCH = 1_000  # the rebuild's checkpoint interval: events per transactional batch
STREAMS = 50
ORDERS = CategoryIdentifier("orders")
SETTINGS = NodeSettings(checkpoint_interval=100)  # the broker's default intervals


class Totals(TransactionalEventProcessor):
    """Events per stream in ``{schema}.totals``: one upsert statement per batch."""

    def __init__(self, schema: str) -> None:
        table = sql.SQL("{}.totals").format(sql.Identifier(schema))
        self.create = sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (stream text PRIMARY KEY, events bigint NOT NULL)"
        ).format(table)
        self.add = sql.SQL(
            "INSERT INTO {} AS t SELECT * FROM unnest(%s::text[], %s::bigint[])"
            " ON CONFLICT (stream) DO UPDATE SET events = t.events + excluded.events"
        ).format(table)

    async def setup(self, transaction: ConsumerTransaction) -> None:
        assert transaction.connection is not None
        await transaction.connection.execute(self.create)

    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        counts: dict[str, int] = {}
        for event in events:
            counts[event.stream] = counts.get(event.stream, 0) + 1
        assert transaction.connection is not None
        streams = sorted(counts)
        await transaction.connection.execute(self.add, (streams, [counts[s] for s in streams]))


async def drain(backend: PostgresBackend, group: str, processor: object, every: int) -> float:
    consumer = EventSourceConsumer(
        EventSource(backend, ORDERS),
        processor,  # type: ignore[arg-type]
        EventConsumerStateStore(backend.checkpoints, group, ORDERS),
        settings=ConsumerSettings(checkpoint_every=every),
    )
    started = time.perf_counter()
    count = await consumer.consume_all()
    return count / (time.perf_counter() - started)


class Built(NamedTuple):
    """One rebuild's figures."""

    rate: float  # events/s, node start to cutover
    first_batch: float  # seconds, node start to the first batch's checkpoint
    batches_rate: float  # events/s after the first batch, its checkpoint to cutover


async def build(backend: PostgresBackend, version: int) -> tuple[EventProcessingNode, Built]:
    """Start a node building ``version``; return it (running) and its figures."""
    totals = Totals(version_schema(backend, "bench", version))
    node = EventProcessingNode(backend, node_id=f"v{version}", settings=SETTINGS)
    node.register_projection(
        name="bench",
        version=version,
        source=ORDERS,
        processor=totals,
        setup=totals.setup,
        checkpoint_interval=BATCH,
        retire_grace=timedelta(0),
        check_interval=timedelta(milliseconds=250),
    )
    group = f"bench-v{version}"
    started = time.perf_counter()
    entering = asyncio.create_task(node.__aenter__())  # ready may come after the cutover
    first: tuple[float, int] | None = None  # (time, events) of the first checkpoint seen
    while True:
        now = time.perf_counter()
        checkpoint = await backend.checkpoints.get(group, ORDERS)
        if first is None and checkpoint is not None and checkpoint.after is not None:
            first = (now, checkpoint.after)
        states = {r.version: r.state for r in await backend.projection_versions.versions("bench")}
        if states.get(version) is VersionState.SERVING:
            break
        await asyncio.sleep(0.02)
    elapsed = now - started
    await entering
    checkpoint = await backend.checkpoints.get(group, ORDERS)
    built = EVENTS if checkpoint is None or checkpoint.after is None else checkpoint.after
    assert first is not None
    return node, Built(built / elapsed, first[0] - started, (built - first[1]) / (now - first[0]))


async def main() -> None:
    schema = f"em_bench_{secrets.token_hex(4)}"
    backend = await PostgresBackend.connect(DSN, schema=schema, min_size=1, max_size=8)
    nodes: list[EventProcessingNode] = []
    background: list[asyncio.Task[None]] = []
    try:
        await backend.install_schema()
        store = EventStore(backend)
        for batch in range(EVENTS // 1_000):
            await store.stream(category="orders", stream=f"s{batch % STREAMS}").publish(
                [NewEvent(name="happened", payload={"n": n}) for n in range(1_000)]
            )
        node, _ = await build(backend, 1)
        nodes.append(node)
        own_totals = Totals(f"{schema}_drain")  # the projection drains write here
        async with backend.connection() as connection:
            await connection.execute(
                sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(f"{schema}_drain"))
            )
            await connection.execute(own_totals.create)
        read = sql.SQL("SELECT stream, events FROM {}.totals").format(
            sql.Identifier(alias_schema(backend, "bench"))
        )
        reads, failures = 0, 0
        published = EVENTS

        async def poll() -> None:
            nonlocal reads, failures
            while True:
                async with backend.connection() as connection:
                    try:
                        rows = await (await connection.execute(read)).fetchall()
                        complete = sum(events for _, events in rows) >= EVENTS
                    except Exception:
                        complete = False
                reads += 1
                failures += not complete
                await asyncio.sleep(0.02)

        async def publish() -> None:
            nonlocal published
            while True:
                await store.stream(category="orders", stream="s0").publish(
                    [NewEvent(name="happened", payload={})]
                )
                published += 1
                await asyncio.sleep(0.02)

        background += [asyncio.create_task(poll()), asyncio.create_task(publish())]
        runs: list[Built] = []
        to_drain, to_projection, batches_to_drain = [], [], []
        for version in (2, 3, 4):
            plain = await drain(backend, f"drain-{version}", Nothing(), 100)
            projected = await drain(backend, f"projected-{version}", own_totals, BATCH)
            node, built = await build(backend, version)
            nodes.append(node)
            runs.append(built)
            to_drain.append(built.rate / plain)
            to_projection.append(built.rate / projected)
            batches_to_drain.append(built.batches_rate / plain)
            report(
                f"postgres.rebuild.v{version}",
                built.rate,
                "events/s",
                drain=round(plain, 1),
                projection_drain=round(projected, 1),
                first_batch_s=round(built.first_batch, 3),
                batches_events_per_s=round(built.batches_rate, 1),
            )
        report(
            "postgres.rebuild.events_per_s", median([r.rate for r in runs]), "events/s", repeats=3
        )
        report("postgres.rebuild.ratio_to_drain", median(to_drain), "ratio", goal=">= 0.8")
        report("postgres.rebuild.ratio_to_projection_drain", median(to_projection), "ratio")
        report("postgres.rebuild.first_batch_s", median([r.first_batch for r in runs]), "s")
        report(
            "postgres.rebuild.batches_events_per_s",
            median([r.batches_rate for r in runs]),
            "events/s",
        )
        report("postgres.rebuild.batches_ratio_to_drain", median(batches_to_drain), "ratio")
        report("postgres.rebuild.reader_failures", failures, "reads", reads=reads)
    finally:
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for node in reversed(nodes):
            await node.__aexit__(None, None, None)
        await backend.close()
        async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as connection:
            cursor = await connection.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (f"{schema}%",)
            )
            for (name,) in await cursor.fetchall():
                await connection.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name))
                )


if __name__ == "__main__":
    asyncio.run(main())

"""A node application for the live-reset and rebuild tests:
``eventmill run tests.component.replay_app:make_node``.

The group ``totals`` shares the category ``orders`` in 8 partitions and keeps an
exactly-once projection (written in the checkpoint transaction): ``applied`` (one row
per event, its primary key refuses an event applied twice) and ``order_totals`` (per
stream: events and summed ``amount``). Its ``on_reset`` hook undoes what the events of
the reset partition after the new place did, and records the reset in ``resets``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from eventmill.backends.base import Backend, ConsumerTransaction
from eventmill.backends.postgres import PostgresBackend
from eventmill.broker.distributed import DistributedEventBrokerSettings
from eventmill.consumers.processors import TransactionalEventProcessor
from eventmill.events import (
    CategoryIdentifier,
    CategoryPartitionIdentifier,
    EventSourceIdentifier,
    StoredEvent,
    source_key,
    stream_hash,
)
from eventmill.node import EventProcessingNode, NodeMode, NodeSettings

PARTITIONS = 8

TABLES = """
CREATE TABLE {schema}.applied (
    event_id text PRIMARY KEY, source_key text NOT NULL, stream text NOT NULL,
    sequence_number bigint NOT NULL, amount bigint NOT NULL);
CREATE TABLE {schema}.order_totals (
    stream text PRIMARY KEY, source_key text NOT NULL, events bigint NOT NULL,
    amount bigint NOT NULL);
CREATE TABLE {schema}.resets (source_key text NOT NULL, after_place bigint, node_id text NOT NULL)
"""

SETTINGS = NodeSettings(
    poll_interval=timedelta(milliseconds=200),
    checkpoint_interval=20,
    shutdown_timeout=timedelta(seconds=5),
    broker_settings=DistributedEventBrokerSettings(
        subscriber_manager_heartbeat_interval=timedelta(milliseconds=200),
        subscriber_manager_purge_interval=timedelta(milliseconds=500),
        subscriber_manager_subscriber_max_age=timedelta(milliseconds=1500),
        coordinator_distribution_interval=timedelta(milliseconds=100),
        observer_synchronisation_interval=timedelta(milliseconds=100),
    ),
)


def partition_key(stream: str) -> str:
    """The source key of the partition ``stream`` falls in."""
    partition = stream_hash(stream) % PARTITIONS
    return source_key(CategoryPartitionIdentifier("orders", partition, PARTITIONS))


class OrderTotals(TransactionalEventProcessor):
    """The projection, written through the batch's transaction."""

    def __init__(self, backend: PostgresBackend, node_id: str) -> None:
        self.node_id = node_id
        sql = backend.sql
        self.insert = sql(
            "INSERT INTO {schema}.applied (event_id, source_key, stream, sequence_number, amount)"
            " VALUES (%s, %s, %s, %s, %s)"
        )
        self.add = sql(
            "INSERT INTO {schema}.order_totals AS t (stream, source_key, events, amount)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (stream) DO UPDATE"
            " SET events = t.events + excluded.events, amount = t.amount + excluded.amount"
        )
        self.forget = sql(
            "DELETE FROM {schema}.applied WHERE source_key = %s"
            " AND (%s::bigint IS NULL OR sequence_number > %s)"
        )
        self.clear = sql("DELETE FROM {schema}.order_totals WHERE source_key = %s")
        self.recount = sql(
            "INSERT INTO {schema}.order_totals (stream, source_key, events, amount)"
            " SELECT stream, source_key, count(*), sum(amount) FROM {schema}.applied"
            " WHERE source_key = %s GROUP BY stream, source_key"
        )
        self.log = sql("INSERT INTO {schema}.resets VALUES (%s, %s, %s)")

    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        sums: dict[str, list[int]] = {}
        rows = []
        for event in events:
            amount = event.payload["amount"]
            assert isinstance(amount, int)
            rows.append(
                (event.id, partition_key(event.stream), event.stream, event.sequence_number, amount)
            )
            total = sums.setdefault(event.stream, [0, 0])
            total[0] += 1
            total[1] += amount
        connection = transaction.connection
        assert connection is not None  # PostgreSQL
        async with connection.cursor() as cursor:
            await cursor.executemany(self.insert, rows)
            await cursor.executemany(
                self.add,
                [(s, partition_key(s), n, amount) for s, (n, amount) in sorted(sums.items())],
            )

    async def on_reset(
        self, source: EventSourceIdentifier, after: int | None, transaction: ConsumerTransaction
    ) -> None:
        key = source_key(source)
        connection = transaction.connection
        assert connection is not None  # PostgreSQL
        await connection.execute(self.forget, (key, after, after))
        await connection.execute(self.clear, (key,))
        await connection.execute(self.recount, (key,))
        await connection.execute(self.log, (key, after, self.node_id))


def make_node(backend: Backend, *, mode: NodeMode, node_id: str | None) -> EventProcessingNode:
    """The node ``eventmill run`` starts."""
    assert isinstance(backend, PostgresBackend)
    node = EventProcessingNode(backend, mode=mode, node_id=node_id, settings=SETTINGS)
    node.register_subscriber(
        group="totals",
        source=CategoryIdentifier("orders"),
        partitions=PARTITIONS,
        processor=OrderTotals(backend, node.node_id),
    )
    return node

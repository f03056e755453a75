"""A node application for ``eventmill run tests.component.node_app:make_node``.

Two groups over the category ``orders``, each recording every processed event into
``{schema}.processed`` inside the batch's checkpoint transaction (exactly-once):
``totals`` shares the category's 4 partitions, ``audit`` reads it whole. Fast broker
settings, so failover takes about two seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from eventmill.backends.base import Backend, ConsumerTransaction
from eventmill.backends.postgres import PostgresBackend
from eventmill.broker.distributed import DistributedEventBrokerSettings
from eventmill.consumers.processors import TransactionalEventProcessor
from eventmill.events import CategoryIdentifier, StoredEvent
from eventmill.node import EventProcessingNode, NodeMode, NodeSettings

TABLE = """
CREATE TABLE {schema}.processed (
    group_name text NOT NULL, event_id text NOT NULL, node_id text NOT NULL,
    stream text NOT NULL
)
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


class Recorder(TransactionalEventProcessor):
    """Inserts one row per event in the checkpoint's transaction."""

    def __init__(self, backend: PostgresBackend, group: str, node_id: str) -> None:
        self.backend = backend
        self.group = group
        self.node_id = node_id
        self.insert = backend.sql(
            "INSERT INTO {schema}.processed "
            "(group_name, event_id, node_id, stream) VALUES (%s, %s, %s, %s)"
        )

    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        connection = transaction.connection
        assert connection is not None  # PostgreSQL
        async with connection.cursor() as cursor:
            await cursor.executemany(
                self.insert,
                [(self.group, e.id, self.node_id, e.stream) for e in events],
            )


def make_node(backend: Backend, *, mode: NodeMode, node_id: str | None) -> EventProcessingNode:
    """The node ``eventmill run`` starts."""
    assert isinstance(backend, PostgresBackend)
    node = EventProcessingNode(backend, mode=mode, node_id=node_id, settings=SETTINGS)
    if mode is not NodeMode.COORDINATOR:
        orders = CategoryIdentifier("orders")
        node.register_subscriber(
            group="totals",
            source=orders,
            partitions=4,
            processor=Recorder(backend, "totals", node.node_id),
        )
        node.register_subscriber(
            group="audit", source=orders, processor=Recorder(backend, "audit", node.node_id)
        )
    return node

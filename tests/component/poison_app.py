"""A node application for the poison-event test:
``eventmill run tests.component.poison_app:make_node``.

Two groups share the category ``orders`` in 16 partitions, each with an exactly-once
processor writing one ``applied`` row per event in the checkpoint transaction (its
primary key refuses an event applied twice): ``totals`` raises on events whose payload
says ``poison`` unless their stream is listed in ``fixed`` (the "deployed fix");
``audit`` never fails. Failures are retried 3 times, 0.1 s apart, then parked.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from eventmill.backends.base import Backend, ConsumerTransaction
from eventmill.backends.postgres import PostgresBackend
from eventmill.broker.distributed import DistributedEventBrokerSettings
from eventmill.consumers.failures import FailurePolicy
from eventmill.consumers.processors import TransactionalEventProcessor
from eventmill.events import CategoryIdentifier, StoredEvent
from eventmill.node import EventProcessingNode, NodeMode, NodeSettings
from eventmill.services.error_handlers import ConstantBackoff

PARTITIONS = 16

TABLES = """
CREATE TABLE {schema}.applied (
    id bigserial, group_name text NOT NULL, event_id text NOT NULL, stream text NOT NULL,
    position bigint NOT NULL, node_id text NOT NULL, PRIMARY KEY (group_name, event_id));
CREATE TABLE {schema}.fixed (stream text PRIMARY KEY)
"""

SETTINGS = NodeSettings(
    poll_interval=timedelta(milliseconds=200),
    checkpoint_interval=50,
    shutdown_timeout=timedelta(seconds=5),
    failure_policy=FailurePolicy(
        max_attempts=3, backoff=ConstantBackoff(timedelta(milliseconds=100))
    ),
    broker_settings=DistributedEventBrokerSettings(
        subscriber_manager_heartbeat_interval=timedelta(milliseconds=200),
        subscriber_manager_purge_interval=timedelta(milliseconds=500),
        subscriber_manager_subscriber_max_age=timedelta(milliseconds=1500),
        coordinator_distribution_interval=timedelta(milliseconds=100),
        observer_synchronisation_interval=timedelta(milliseconds=100),
    ),
)


class Applying(TransactionalEventProcessor):
    """Records each event of its batch; with ``poisonable``, raises on a poison event of
    a stream not fixed yet (after its batch wrote rows, which must roll back)."""

    def __init__(self, backend: PostgresBackend, group: str, node_id: str, poisonable: bool):
        self.group = group
        self.node_id = node_id
        self.poisonable = poisonable
        self.insert = backend.sql(
            "INSERT INTO {schema}.applied (group_name, event_id, stream, position, node_id)"
            " VALUES (%s, %s, %s, %s, %s)"
        )
        self.is_fixed = backend.sql("SELECT count(*) FROM {schema}.fixed WHERE stream = %s")

    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        connection = transaction.connection
        assert connection is not None  # PostgreSQL
        async with connection.cursor() as cursor:
            await cursor.executemany(
                self.insert,
                [(self.group, e.id, e.stream, e.position, self.node_id) for e in events],
            )
            for event in events:
                if self.poisonable and event.payload.get("poison"):
                    await cursor.execute(self.is_fixed, (event.stream,))
                    if (await cursor.fetchone()) == (0,):
                        raise ValueError(f"cannot total {event.stream}: no amount")


def make_node(backend: Backend, *, mode: NodeMode, node_id: str | None) -> EventProcessingNode:
    """The node ``eventmill run`` starts."""
    assert isinstance(backend, PostgresBackend)
    node = EventProcessingNode(backend, mode=mode, node_id=node_id, settings=SETTINGS)
    for group, poisonable in (("totals", True), ("audit", False)):
        node.register_subscriber(
            group=group,
            source=CategoryIdentifier("orders"),
            partitions=PARTITIONS,
            processor=Applying(backend, group, node.node_id, poisonable),
        )
    return node

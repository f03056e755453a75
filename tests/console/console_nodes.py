"""A node application for the console's browser tests
(``eventmill run tests.console.console_nodes:make_node``).

Two groups: ``fast`` over the 4 partitions of ``orders``, and ``slow`` over the 2
partitions of ``invoices``, whose processor waits ``{schema}.pace.delay`` seconds per
event (a test slows it down and speeds it up by updating that row) and fails on an
event with ``"poison": true`` in its payload until ``{schema}.pace.fixed`` is true;
``slow`` parks a stream at its first failure. Fast broker settings, so a killed node's
sources move within about two seconds.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from eventmill.backends.base import Backend
from eventmill.backends.postgres import PostgresBackend
from eventmill.broker.distributed import DistributedEventBrokerSettings
from eventmill.consumers.failures import FailurePolicy
from eventmill.consumers.processors import EventProcessor
from eventmill.events import CategoryIdentifier, StoredEvent
from eventmill.node import EventProcessingNode, NodeMode, NodeSettings

PACE_TABLE = (
    "CREATE TABLE {schema}.pace (delay double precision NOT NULL, fixed boolean NOT NULL);"
    " INSERT INTO {schema}.pace VALUES (0, false)"
)

SETTINGS = NodeSettings(
    poll_interval=timedelta(milliseconds=200),
    checkpoint_interval=5,
    shutdown_timeout=timedelta(seconds=5),
    broker_settings=DistributedEventBrokerSettings(
        subscriber_manager_heartbeat_interval=timedelta(milliseconds=200),
        subscriber_manager_purge_interval=timedelta(milliseconds=500),
        subscriber_manager_subscriber_max_age=timedelta(milliseconds=1500),
        coordinator_distribution_interval=timedelta(milliseconds=100),
        observer_synchronisation_interval=timedelta(milliseconds=100),
    ),
)
"""The nodes' settings (the console test judges liveness with the same max age)."""


class Ignore(EventProcessor):
    """Processes an event by doing nothing."""

    async def process_event(self, event: StoredEvent) -> None:
        return None


class Paced(EventProcessor):
    """Waits the current delay (read at most every 0.2 s) per event; fails on a poison
    event unless the pace row says it is fixed."""

    def __init__(self, backend: PostgresBackend) -> None:
        self.backend = backend
        self.delay = 0.0
        self.read_at = 0.0

    async def process_event(self, event: StoredEvent) -> None:
        if time.monotonic() - self.read_at > 0.2:
            async with self.backend.connection() as connection:
                cursor = await connection.execute(
                    self.backend.sql("SELECT delay FROM {schema}.pace")
                )
                row = await cursor.fetchone()
            self.delay = 0.0 if row is None else float(row[0])
            self.read_at = time.monotonic()
        if self.delay:
            await asyncio.sleep(self.delay)
        if event.payload.get("poison") is True:
            async with self.backend.connection() as connection:
                cursor = await connection.execute(
                    self.backend.sql("SELECT fixed FROM {schema}.pace")
                )
                row = await cursor.fetchone()
            if row is None or row[0] is not True:
                raise ValueError(f"cannot process poison event {event.sequence_number}")


def make_node(backend: Backend, *, mode: NodeMode, node_id: str | None) -> EventProcessingNode:
    """The node ``eventmill run`` starts."""
    assert isinstance(backend, PostgresBackend)
    node = EventProcessingNode(backend, mode=mode, node_id=node_id, settings=SETTINGS)
    if mode is not NodeMode.COORDINATOR:
        node.register_subscriber(
            group="fast", source=CategoryIdentifier("orders"), partitions=4, processor=Ignore()
        )
        node.register_subscriber(
            group="slow",
            source=CategoryIdentifier("invoices"),
            partitions=2,
            processor=Paced(backend),
            failure_policy=FailurePolicy(max_attempts=1),
        )
    return node

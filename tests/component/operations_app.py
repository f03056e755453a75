"""A node application for the operations test (``eventmill run
tests.component.operations_app:make_node``): groups ``fast`` and ``slow`` share the
category ``orders`` in 4 partitions; ``slow`` waits before each event while the file
named by ``$EVENTMILL_TEST_HOLD`` exists. Fast broker settings (max age 1.5 s)."""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta

from eventmill.backends.base import Backend
from eventmill.broker.distributed import DistributedEventBrokerSettings
from eventmill.events import CategoryIdentifier, StoredEvent
from eventmill.node import EventProcessingNode, NodeMode, NodeSettings

SETTINGS = NodeSettings(
    distributed=True,
    poll_interval=timedelta(milliseconds=200),
    shutdown_timeout=timedelta(seconds=5),
    broker_settings=DistributedEventBrokerSettings(
        subscriber_manager_heartbeat_interval=timedelta(milliseconds=200),
        subscriber_manager_purge_interval=timedelta(milliseconds=500),
        subscriber_manager_subscriber_max_age=timedelta(milliseconds=1500),
        coordinator_distribution_interval=timedelta(milliseconds=100),
        observer_synchronisation_interval=timedelta(milliseconds=100),
    ),
)


async def ignore(event: StoredEvent) -> None:
    """Processes at once."""


async def held(event: StoredEvent) -> None:
    """Waits while the hold file exists."""
    hold = os.environ.get("EVENTMILL_TEST_HOLD", "")
    while hold and os.path.exists(hold):  # noqa: ASYNC110, ASYNC240 (another process's file)
        await asyncio.sleep(0.02)


def make_node(backend: Backend, *, mode: NodeMode, node_id: str | None) -> EventProcessingNode:
    node = EventProcessingNode(backend, mode=mode, node_id=node_id, settings=SETTINGS)
    orders = CategoryIdentifier("orders")
    node.register_subscriber(group="fast", source=orders, partitions=4, processor=ignore)
    node.register_subscriber(group="slow", source=orders, partitions=4, processor=held)
    return node

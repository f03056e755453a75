"""A distributed node on PostgreSQL gets ready and catches up without waiting out its
broker's rounds: ``wait_ready`` wakes the coordinator and the observer."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta

import pytest

from eventmill import CategoryIdentifier, NewEvent, StoredEvent
from eventmill.broker.distributed import DistributedEventBrokerSettings
from eventmill.node import EventProcessingNode, NodeSettings
from eventmill.store import EventStore
from tests.postgres_support import fresh_postgres_backend

pytestmark = pytest.mark.postgres

HOURLY = DistributedEventBrokerSettings(
    subscriber_manager_heartbeat_interval=timedelta(milliseconds=200),
    subscriber_manager_subscriber_max_age=timedelta(seconds=30),
    coordinator_distribution_interval=timedelta(hours=1),
    observer_synchronisation_interval=timedelta(hours=1),
)


async def test_a_node_starts_and_catches_up_with_rounds_an_hour_apart() -> None:
    """Before, the start and each ``wait_caught_up`` waited for the next round of each
    loop: with rounds an hour apart this timed out."""
    async with fresh_postgres_backend() as backend:
        stream = EventStore(backend).stream(category="orders", stream="o-1")
        ids = [e.id for e in await stream.publish([NewEvent(name="placed") for _ in range(5)])]
        seen: Counter[str] = Counter()

        async def count(event: StoredEvent) -> None:
            seen[event.id] += 1

        settings = NodeSettings(distributed=True, broker_settings=HOURLY)
        node = EventProcessingNode(backend, node_id="n1", settings=settings)
        node.register_subscriber(group="g", source=CategoryIdentifier("orders"), processor=count)
        async with asyncio.timeout(30), node:
            await node.wait_caught_up(timeout=10)
            ids += [e.id for e in await stream.publish([NewEvent(name="paid")])]
            await node.wait_caught_up(timeout=10)
        assert seen == Counter(dict.fromkeys(ids, 1))

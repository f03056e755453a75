"""A distributed node keeps a record of itself (mode, leadership term) that status
reads, in every mode, and removes it when it stops gracefully."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from eventmill.backends.base import NodeRecord
from eventmill.backends.memory import InMemoryBackend
from eventmill.broker.distributed import DistributedEventBrokerSettings
from eventmill.node import EventProcessingNode, NodeMode, NodeSettings

FAST = NodeSettings(
    distributed=True,
    broker_settings=DistributedEventBrokerSettings(
        subscriber_manager_heartbeat_interval=timedelta(milliseconds=20),
        subscriber_manager_subscriber_max_age=timedelta(milliseconds=500),
        coordinator_distribution_interval=timedelta(milliseconds=20),
        observer_synchronisation_interval=timedelta(milliseconds=20),
    ),
)


async def wait_for_records(backend: InMemoryBackend, count: int) -> list[NodeRecord]:
    deadline = time.monotonic() + 10
    while True:
        records = await backend.nodes.list()
        if len(records) == count and any(r.leader_term is not None for r in records):
            return records
        assert time.monotonic() < deadline, records
        await asyncio.sleep(0.01)


async def test_nodes_record_mode_and_leadership_and_leave_on_stop() -> None:
    backend = InMemoryBackend()
    coordinator = EventProcessingNode(
        backend, mode=NodeMode.COORDINATOR, node_id="c", settings=FAST
    )
    observer = EventProcessingNode(backend, mode=NodeMode.OBSERVER, node_id="o", settings=FAST)
    async with coordinator, observer:
        records = await wait_for_records(backend, 2)
        assert [(r.node_id, r.mode, r.leader_term) for r in records] == [
            ("c", "coordinator", 1),
            ("o", "observer", None),
        ]
    assert await backend.nodes.list() == []

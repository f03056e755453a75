"""The database goes away under running nodes (the test's own PostgreSQL cluster is
stopped, then started again): the nodes keep running, back off instead of spinning
(their log stays short), report ERRORED while it is away, and recover on their own
when it returns: healthy again, and every event published meanwhile and after
processed exactly once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from eventmill.errors import StorageError
from eventmill.events import NewEvent
from tests.harness.faults import FaultCluster, FaultGroup, Publisher
from tests.postgres_support import unique_schema_name
from tests.servers import PrivateCluster

pytestmark = pytest.mark.postgres

OUTAGE = 8.0
"""Seconds the server stays down."""
GROUPS = [
    FaultGroup(group="exact", category="ticks", partitions=2),
    FaultGroup(group="at-least-once", category="ticks", transactional=False),
]
NODES = ("n1", "n2")


@pytest.fixture
async def cluster(own_cluster: PrivateCluster) -> AsyncIterator[FaultCluster]:
    async with FaultCluster(
        own_cluster.dsn(), unique_schema_name(), server=own_cluster, groups=GROUPS
    ) as running:
        yield running


async def publish_until_it_works(cluster: FaultCluster, count: int) -> None:
    """Publish ``count`` events, retrying each until it commits (pool connections broken
    by the restart fail once each)."""
    for n in range(count):
        async with asyncio.timeout(30):
            while True:
                try:
                    await cluster.store.stream(category="ticks", stream=f"after-{n % 4}").publish(
                        [NewEvent(name="after", payload={"n": n})]
                    )
                    break
                except StorageError:
                    await asyncio.sleep(0.1)


async def test_nodes_ride_out_a_database_outage(cluster: FaultCluster) -> None:
    for node_id in NODES:
        await cluster.start(node_id)
    publisher = Publisher(cluster.store, "ticks", rate=20)
    publishing = asyncio.get_running_loop().create_task(publisher.run())
    await cluster.wait_quiescent(timeout=timedelta(seconds=30))
    lines_before = {n: len(cluster.nodes[n].log_lines) for n in NODES}
    unhealthy_at: dict[str, float] = {}
    healthy_while_down: list[tuple[str, dict[str, object]]] = []
    async with cluster.server_stopped():
        stopped = time.monotonic()
        while (elapsed := time.monotonic() - stopped) < OUTAGE:
            for node_id in NODES:
                node = cluster.nodes[node_id]
                assert node.process.returncode is None, f"{node_id} exited during the outage"
                latest = node.latest
                assert latest is not None
                if not node.healthy:
                    unhealthy_at.setdefault(node_id, elapsed)
                elif node_id in unhealthy_at and latest["time"] > time.time() - 0.5:
                    healthy_while_down.append((node_id, latest))
            await asyncio.sleep(0.1)
        down_lines = {
            n: [at - stopped for at, _ in cluster.nodes[n].log_lines[lines_before[n] :]]
            for n in NODES
        }
    back = time.monotonic()
    publishing.cancel()
    print(f"unhealthy after (s): {unhealthy_at}")
    print(f"log lines while down: { {n: len(lines) for n, lines in down_lines.items()} }")

    assert set(unhealthy_at) == set(NODES), "every node reports the outage"
    assert all(at < OUTAGE / 2 for at in unhealthy_at.values()), unhealthy_at
    assert healthy_while_down == [], "a node reported healthy while the database was down"
    for node_id, times in down_lines.items():
        # Backing off: a few lines a second at first, fewer later; a tight loop logs
        # thousands.
        assert len(times) <= 20 * OUTAGE, (node_id, len(times))
        late = [t for t in times if t >= OUTAGE / 2]
        early = [t for t in times if t < OUTAGE / 2]
        assert len(late) <= len(early) + 10, (node_id, len(early), len(late))

    await cluster.wait_healthy(timeout=timedelta(seconds=60))
    healthy = time.monotonic() - back
    await publish_until_it_works(cluster, 8)
    await cluster.wait_quiescent(timeout=timedelta(seconds=60))
    processing = time.monotonic() - back
    print(
        f"server back -> every node healthy: {healthy:.2f} s; "
        f"-> new events processed by every group: {processing:.2f} s"
    )
    report = await cluster.check()
    print(report.to_json())
    assert report.violations == []
    assert report.duplicates["exact"] == 0

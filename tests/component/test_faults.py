"""Faults on a seeded random schedule against three node processes on the test's own
PostgreSQL cluster while events are published: SIGKILL (and restart) of a node,
SIGSTOP/SIGCONT of a node for twice the subscriber max age (a zombie that wakes up),
``pg_terminate_backend`` of random node connections, one restart of the server. After
the faults, once every event is processed: nothing missed, exactly-once groups
processed each event once, the at-least-once group within its bound, no two holders of
a source processed it at the same time, no checkpoint moved backwards, every node
healthy, nothing leaked.

The seed is printed; ``EVENTMILL_FAULT_SEED=<seed>`` replays a run and
``EVENTMILL_FAULT_SECONDS`` sets the schedule's length (default 20)."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from tests.harness.faults import (
    FaultCluster,
    FaultGroup,
    FaultSchedule,
    Publisher,
)
from tests.postgres_support import unique_schema_name
from tests.servers import PrivateCluster

pytestmark = pytest.mark.postgres

GROUPS = [
    FaultGroup(group="exact-partitions", category="ticks", partitions=4),
    FaultGroup(group="exact-whole", category="ticks"),
    FaultGroup(group="at-least-once", category="ticks", partitions=2, transactional=False),
]
NODES = ("n1", "n2", "n3")
TASK_SLACK = 4
"""Tasks a node may have beyond its count before the faults (passes in flight)."""


@pytest.fixture
async def cluster(own_cluster: PrivateCluster) -> AsyncIterator[FaultCluster]:
    async with FaultCluster(
        own_cluster.dsn(), unique_schema_name(), server=own_cluster, groups=GROUPS
    ) as running:
        yield running


async def test_guarantees_hold_under_random_faults(cluster: FaultCluster) -> None:
    seed = int(os.environ.get("EVENTMILL_FAULT_SEED", random.randrange(2**32)))
    seconds = float(os.environ.get("EVENTMILL_FAULT_SECONDS", 20))
    schedule = FaultSchedule.generate(
        seed, duration=timedelta(seconds=seconds), nodes=NODES, restarts=1
    )
    print(f"EVENTMILL_FAULT_SEED={seed} schedule {schedule.counts()}")
    await asyncio.gather(*(cluster.start(node_id) for node_id in NODES))
    publisher = Publisher(cluster.store, "ticks", rate=40, seed=seed)
    for _ in range(40):
        await publisher.publish_one()
    await cluster.wait_quiescent(timeout=timedelta(seconds=30))
    before = {n: cluster.nodes[n].latest for n in NODES}
    publishing = asyncio.get_running_loop().create_task(publisher.run())
    try:
        await cluster.inject(schedule)
    finally:
        publishing.cancel()
    await cluster.wait_quiescent(timeout=timedelta(seconds=90))
    report = await cluster.check()
    resources = cluster.resources()
    print(
        f"EVENTMILL_FAULT_SEED={seed} injected {dict(cluster.injected)} "
        f"connections terminated {cluster.terminated}; published {publisher.published} "
        f"(failed {publisher.failed}); {report.to_json()}; {resources}"
    )
    assert report.violations == [], f"seed {seed}"
    assert all(report.events[group.group] >= publisher.published for group in GROUPS)
    for node_id, first in before.items():
        latest = cluster.nodes[node_id].latest
        assert first is not None and latest is not None
        assert latest["threads"] <= first["threads"], (seed, node_id, first, latest)
        assert latest["tasks"] <= first["tasks"] + TASK_SLACK, (seed, node_id, first, latest)

"""The node suite through PgBouncer (issue 11): in session mode, and in transaction
mode with a direct DSN beside it for the sessions (locks, LISTEN, heartbeats,
migrations). Node processes (``EventProcessingNode``, tests/harness/faults.py) connect
through a real PgBouncer in front of the session's private cluster, and so does the
harness: one leader (the lock's holder is the node whose
record says it leads), the partitions assigned across the nodes, every event processed
exactly once, wake-ups by LISTEN/NOTIFY (the nodes poll once a minute only, so an event
processed sooner was announced), and a SIGKILLed node's partitions taken over."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta

import psycopg
import pytest
from psycopg import sql

from eventmill.backends.base import HoldingState
from eventmill.broker.coordinator import COORDINATOR_LOCK
from eventmill.events import NewEvent
from tests.harness.faults import FaultCluster, FaultGroup, FaultNodeSettings
from tests.integration.test_postgres_ordering import wait_until
from tests.postgres_support import unique_schema_name
from tests.servers import Bouncer, PrivateCluster

pytestmark = pytest.mark.postgres

GROUP = FaultGroup(group="exact", category="ticks", partitions=4)
SETTINGS = FaultNodeSettings(poll_interval=timedelta(minutes=1))
"""Polls too rare to process anything in the test's time: wake-ups must do it."""
QUIET = timedelta(seconds=20)
"""How long the test waits for processing, well under the poll interval."""
STREAMS = [f"s-{n}" for n in range(12)]


@pytest.fixture(params=["session", "transaction with a direct dsn"])
async def cluster(
    request: pytest.FixtureRequest,
    private_cluster: PrivateCluster,
    session_bouncer: Bouncer,
    transaction_bouncer: Bouncer,
) -> AsyncIterator[FaultCluster]:
    schema = unique_schema_name()
    session = request.param == "session"
    try:
        async with FaultCluster(
            (session_bouncer if session else transaction_bouncer).dsn(),
            schema,
            server=private_cluster,
            direct_dsn=None if session else private_cluster.dsn(),
            groups=[GROUP],
            settings=SETTINGS,
        ) as running:
            yield running
    finally:
        async with await psycopg.AsyncConnection.connect(
            private_cluster.dsn(), autocommit=True
        ) as connection:
            await connection.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
            )


async def publish(cluster: FaultCluster, first: int, count: int) -> None:
    for n in range(first, first + count):
        await cluster.store.stream(category="ticks", stream=STREAMS[n % len(STREAMS)]).publish(
            [NewEvent(name="tick", payload={"n": n})]
        )


async def holders(cluster: FaultCluster) -> Counter[str | None]:
    """How many of the group's partitions each node holds (ASSIGNED)."""
    assert cluster.backend is not None
    found = await cluster.backend.subscriptions.list(group=GROUP.group)
    return Counter(h.node_id for h in found if h.state is HoldingState.ASSIGNED)


async def wait_for_holders(cluster: FaultCluster, wanted: dict[str, int]) -> None:
    async def held_as_wanted() -> bool:
        return await holders(cluster) == Counter(wanted)

    await wait_until(held_as_wanted, QUIET.total_seconds())


async def test_nodes_through_pgbouncer(cluster: FaultCluster) -> None:
    assert cluster.backend is not None
    await asyncio.gather(cluster.start("n1"), cluster.start("n2"))
    await wait_for_holders(cluster, {"n1": 2, "n2": 2})

    # One leader: the lock's holder (seen by the server) is the node that says it leads.
    holder = await cluster.backend.locks.holder(COORDINATOR_LOCK)
    assert holder is not None and holder.application_name is not None
    leading = [r.node_id for r in await cluster.backend.nodes.list() if r.leader_term]
    assert leading == [holder.application_name.split("/", 1)[1]]

    await publish(cluster, 0, 40)
    await cluster.wait_quiescent(timeout=QUIET)  # woken by NOTIFY, not polled
    async with cluster.backend.connection() as connection:
        cursor = await connection.execute(
            cluster.backend.sql("SELECT DISTINCT node_id FROM {schema}.processed")
        )
        assert {row[0] for row in await cursor.fetchall()} == {"n1", "n2"}

    await cluster.kill("n2")
    await publish(cluster, 40, 40)
    await wait_for_holders(cluster, {"n1": 4})
    await cluster.wait_quiescent(timeout=QUIET)

    report = await cluster.check()
    print(report.to_json())
    assert report.violations == []
    assert report.events == {GROUP.group: 80}
    assert report.duplicates == {GROUP.group: 0}

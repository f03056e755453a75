"""A 16-partition group across node processes on PostgreSQL (NodeSet): six instances
(three nodes' worth of two each, one process per instance), one more added and one
SIGKILLed while events keep coming. Every event is processed exactly once (the
recorder writes in the checkpoint transaction), and each stream in order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest

from eventmill import NewEvent
from eventmill.backends.base import HoldingState
from eventmill.backends.postgres import PostgresBackend
from eventmill.broker.distributed import DistributedEventBrokerSettings
from eventmill.store import EventStore
from tests.harness.node_process import GroupConfig
from tests.harness.nodes import NodeSet
from tests.postgres_support import fresh_postgres_backend

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

FAST = DistributedEventBrokerSettings(
    subscriber_manager_heartbeat_interval=timedelta(milliseconds=300),
    subscriber_manager_purge_interval=timedelta(seconds=2),
    subscriber_manager_subscriber_max_age=timedelta(seconds=2),
    coordinator_distribution_interval=timedelta(milliseconds=100),
    coordinator_leadership_max_duration=timedelta(minutes=5),
    observer_synchronisation_interval=timedelta(milliseconds=100),
)
GROUP = GroupConfig(group="g", category="orders", partitions=16)
STREAMS = 60
DEADLINE = 90.0


async def wait_until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def processed_count(backend: PostgresBackend) -> int:
    async with backend.connection() as connection:
        cursor = await connection.execute(backend.sql("SELECT count(*) FROM {schema}.processed"))
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def publish_rounds(store: EventStore, first: int, rounds: int) -> None:
    for number in range(first, first + rounds):
        for stream in range(STREAMS):
            await store.stream(category="orders", stream=f"order-{stream}").publish(
                [NewEvent(name="placed", payload={"round": number})]
            )


async def test_every_event_once_and_in_stream_order_as_instances_join_and_die() -> None:
    async with (
        fresh_postgres_backend(max_size=3) as backend,
        NodeSet(
            backend,
            groups=[GROUP],
            settings=FAST,
            poll_interval=timedelta(milliseconds=200),
            checkpoint_every=5,
            pool_size=2,
        ) as nodes,
    ):
        store = EventStore(backend)
        await publish_rounds(store, 0, 10)
        started = [await nodes.start(f"node-{n // 2}-{n % 2}") for n in range(6)]

        def progressed(count: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return await processed_count(backend) >= count

            return check

        await wait_until(progressed(150), "progress with six instances")
        await nodes.start("node-3-0")  # an instance joins

        async def joiner_holds_a_partition() -> bool:
            holdings = await backend.subscriptions.list(group="g")
            return any(
                h.subscriber_id == "g@node-3-0" and h.state is HoldingState.ASSIGNED
                for h in holdings
            )

        # Publish only once it holds one, so that it has events of its own to process.
        await wait_until(joiner_holds_a_partition, "the joining instance to get a partition")
        publishing = asyncio.create_task(publish_rounds(store, 10, 10))
        await wait_until(progressed(400), "progress after a join")
        await nodes.kill(started[2])  # an instance dies mid-stream
        await publishing
        total = STREAMS * 20

        async def settled() -> bool:
            holdings = await backend.subscriptions.list(group="g")
            holders = {h.subscriber_id for h in holdings if h.state is HoldingState.ASSIGNED}
            return len(holdings) == 16 and "g@node-1-0" not in holders

        await wait_until(settled, "the killed instance's partitions to move")
        await wait_until(progressed(total), "every event")
        for node in list(nodes.nodes):  # graceful stops: nothing may be processed again
            assert await nodes.stop(node) == 0

        async with backend.connection() as connection:
            cursor = await connection.execute(
                backend.sql(
                    "SELECT p.event_id, e.stream, e.position, p.subscriber_id"
                    " FROM {schema}.processed AS p JOIN {schema}.events AS e"
                    " ON e.id::text = p.event_id ORDER BY p.at, p.sequence_number"
                )
            )
            rows = await cursor.fetchall()
    assert len(rows) == total
    assert len({row[0] for row in rows}) == total
    for stream in range(STREAMS):
        name = f"order-{stream}"
        assert [row[2] for row in rows if row[1] == name] == list(range(20)), name
    holders = {row[3] for row in rows}
    assert "g@node-3-0" in holders and len(holders) >= 6

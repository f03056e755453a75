"""A slow database does not look like dead nodes: two node processes with the default
broker settings (heartbeat 1 s, max age 5 s) reach PostgreSQL through a DelayProxy.

1. Every statement of the nodes delayed by 1.5 s (within the latency budget): events
   are still processed, exactly once, and no source moves.
2. Every heartbeat committing 3 s after it started (a server-side delay: its ``now()``
   is 3 s old when others can see it; beyond the budget): still no source moves. Before
   liveness was measured from the freshest heartbeat, live nodes were declared dead.
3. A node SIGKILLed while heartbeats commit 1 s late is still taken over, and the
   survivor processes its sources' events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from eventmill import NewEvent
from eventmill.backends.postgres import PostgresBackend
from eventmill.broker.distributed import DistributedEventBrokerSettings
from eventmill.store import EventStore
from tests.delay_proxy import DelayProxy
from tests.harness.node_process import GroupConfig
from tests.harness.nodes import NodeSet
from tests.postgres_support import TEST_DSN, fresh_postgres_backend

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

GROUPS = [GroupConfig(group=f"g{n}", category="orders", partitions=4) for n in range(2)]
SOURCES = sum(group.partitions for group in GROUPS)
DEADLINE = 60.0

HEARTBEAT_LAG = """
CREATE TABLE {schema}.heartbeat_lag (seconds float8 NOT NULL, fired bigint NOT NULL);
INSERT INTO {schema}.heartbeat_lag VALUES (0, 0);
CREATE FUNCTION {schema}.lag_heartbeat() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE lag float8;
BEGIN
    SELECT seconds INTO lag FROM {schema}.heartbeat_lag;
    IF lag > 0 THEN
        PERFORM pg_sleep(lag);
        UPDATE {schema}.heartbeat_lag SET fired = fired + 1;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER lag_heartbeat AFTER INSERT ON {schema}.subscribers
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.lag_heartbeat();
"""
"""Makes every upsert into the subscribers table commit ``seconds`` after it started."""


async def wait_until(
    check: Callable[[], Awaitable[bool]],
    what: str,
    explain: Callable[[], Awaitable[str]] | None = None,
) -> None:
    """Poll ``check`` until it is true; after DEADLINE fail with ``explain()``'s text."""
    deadline = time.monotonic() + DEADLINE
    while not await check():
        if time.monotonic() >= deadline:
            details = "" if explain is None else "\n" + await explain()
            pytest.fail(f"timed out waiting for {what}{details}")
        await asyncio.sleep(0.1)


async def state_of(backend: PostgresBackend, nodes: NodeSet) -> str:
    """The holdings, checkpoints and processed events by source, for a failure message;
    the nodes print their task stacks to stderr (which pytest shows with it)."""
    for node in nodes.nodes:
        nodes.dump_tasks(node)
    holdings = await fetch(
        backend,
        "SELECT s.group_name, s.source_key, s.node_id, s.epoch, s.state, c.after_place,"
        " c.epoch, (SELECT count(*) FROM {schema}.processed p WHERE p.group_name ="
        " s.group_name AND p.source_key = s.source_key), (SELECT max(sequence_number)"
        " FROM {schema}.processed p WHERE p.group_name = s.group_name AND p.source_key ="
        " s.source_key) FROM {schema}.subscriptions s LEFT JOIN {schema}.checkpoints c"
        " USING (group_name, source_key) ORDER BY 1, 2",
    )
    subscribers = await fetch(
        backend,
        "SELECT group_name, subscriber_id, now() - last_seen FROM {schema}.subscribers"
        " ORDER BY 1, 2",
    )
    head = await fetch(backend, "SELECT max(sequence_number) FROM {schema}.events")
    lines = [f"newest event: {head[0][0]}; subscribers (group, id, age): {subscribers}"]
    lines.append("group, source, holder, epoch, state, checkpoint, its epoch, processed, last")
    lines += [", ".join(map(str, row)) for row in holdings]
    return "\n".join(lines)


async def fetch(backend: PostgresBackend, query: str, *args: Any) -> list[tuple[Any, ...]]:
    async with backend.connection() as connection:
        cursor = await connection.execute(backend.sql(query), args)
        return await cursor.fetchall()


async def holdings(backend: PostgresBackend) -> dict[tuple[str, str], tuple[int, str]]:
    """(epoch, node) of every assigned source, by (group, source key)."""
    rows = await fetch(
        backend,
        "SELECT group_name, source_key, epoch, node_id FROM {schema}.subscriptions"
        " WHERE state = 'assigned'",
    )
    return {(row[0], row[1]): (row[2], row[3]) for row in rows}


async def set_heartbeat_lag(backend: PostgresBackend, seconds: float) -> int:
    """Set the lag; return how many lagged heartbeats there were so far."""
    rows = await fetch(
        backend, "UPDATE {schema}.heartbeat_lag SET seconds = %s RETURNING fired", seconds
    )
    return int(rows[0][0])


async def lagged_heartbeats(backend: PostgresBackend) -> int:
    return int((await fetch(backend, "SELECT fired FROM {schema}.heartbeat_lag"))[0][0])


async def test_a_slow_database_moves_no_source_and_a_dead_node_is_still_taken_over() -> None:
    async with (
        fresh_postgres_backend() as backend,
        DelayProxy("127.0.0.1", 5432) as proxy,
        AsyncConnectionPool(
            proxy.dsn(TEST_DSN), min_size=1, max_size=2, kwargs={"autocommit": True}
        ) as slow_pool,
    ):
        async with backend.connection() as connection:
            await connection.execute(backend.sql(HEARTBEAT_LAG))
        slow = PostgresBackend(slow_pool, schema=backend.schema)
        store = EventStore(backend)
        published = 0

        async def publish(count: int) -> None:
            nonlocal published
            for _ in range(count):
                await store.stream(category="orders", stream=f"o-{published % 16}").publish(
                    [NewEvent(name="placed", payload={"n": published})]
                )
                published += 1

        async def all_processed_once() -> bool:
            rows = await fetch(
                backend,
                "SELECT count(*), count(DISTINCT (group_name, event_id)) FROM {schema}.processed",
            )
            total, distinct = rows[0]
            assert total == distinct, "an event was processed twice"
            assert total <= published * len(GROUPS), "more events processed than published"
            return bool(total == published * len(GROUPS))

        async with NodeSet(
            slow, groups=GROUPS, settings=DistributedEventBrokerSettings(), pool_size=3
        ) as nodes:
            first = await nodes.start()
            second = await nodes.start()

            def explain() -> Awaitable[str]:
                return state_of(backend, nodes)

            async def balanced() -> bool:
                held = await holdings(backend)
                per_node = [v[1] for v in held.values()].count(first.node_id)
                return len(held) == SOURCES and per_node == SOURCES // 2

            await wait_until(balanced, "the sources to be spread over both nodes", explain)
            before = await holdings(backend)

            # 1. Every statement 1.5 s late: processing goes on, nothing moves.
            proxy.delay = 1.5
            await publish(12)
            await wait_until(all_processed_once, "the events to be processed", explain)
            proxy.delay = 0.0
            assert await holdings(backend) == before

            # 2. Heartbeats committing 3 s after their now(): nothing moves either.
            fired = await set_heartbeat_lag(backend, 3.0)

            async def four_lagged_heartbeats() -> bool:
                return await lagged_heartbeats(backend) >= fired + 4

            await wait_until(four_lagged_heartbeats, "lagged heartbeats", explain)
            assert await holdings(backend) == before

            # 3. A node killed while heartbeats commit 1 s late is taken over.
            await set_heartbeat_lag(backend, 1.0)
            await nodes.kill(second)
            killed_at = time.monotonic()

            async def taken_over() -> bool:
                held = await holdings(backend)
                return len(held) == SOURCES and all(v[1] == first.node_id for v in held.values())

            await wait_until(taken_over, "the survivor to hold every source", explain)
            print(f"taken over {time.monotonic() - killed_at:.1f} s after the kill")
            await publish(8)
            await wait_until(all_processed_once, "the events after the takeover", explain)

"""A live ``eventmill reset totals --to-start`` on PostgreSQL: three node processes
(``eventmill run tests.component.replay_app:make_node``) share 8 partitions while
events keep being published. Every partition replays once (its ``on_reset`` hook runs
once, in the first replayed batch), no node restarts or logs an error, and the
exactly-once projection ends equal to one built from scratch from the events."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from eventmill.backends.postgres import PostgresBackend
from eventmill.events import NewEvent
from eventmill.store import EventStore
from tests.component.replay_app import PARTITIONS, TABLES
from tests.harness.eventmill_process import ROOT, start_eventmill
from tests.postgres_support import TEST_DSN, drop_schema, unique_schema_name

pytestmark = pytest.mark.postgres

STREAMS = 40


@pytest.fixture
async def backend() -> AsyncIterator[PostgresBackend]:
    schema = unique_schema_name()
    backend = await PostgresBackend.connect(TEST_DSN, schema=schema, max_size=3)
    try:
        await backend.install_schema()
        async with backend.connection() as connection:
            for statement in TABLES.split(";"):
                await connection.execute(backend.sql(statement))
        yield backend
    finally:
        await backend.close()
        await drop_schema(schema)


async def wait_for(condition: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    try:
        async with asyncio.timeout(within):
            while not await condition():  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def rows(backend: PostgresBackend, query: str) -> list[tuple[Any, ...]]:
    async with backend.connection() as connection:
        cursor = await connection.execute(backend.sql(query))
        return await cursor.fetchall()


async def test_live_reset_to_start_replays_every_partition_exactly_once(
    backend: PostgresBackend,
) -> None:
    store = EventStore(backend)
    published = 0

    async def publish(rounds: int) -> None:
        nonlocal published
        for _ in range(rounds):
            for stream in range(STREAMS):
                await store.stream(category="orders", stream=f"order-{stream}").publish(
                    [NewEvent(name="placed", payload={"amount": published % 7 + 1})]
                )
                published += 1

    async def applied() -> int:
        return int((await rows(backend, "SELECT count(*) FROM {schema}.applied"))[0][0])

    nodes = {
        node_id: start_eventmill(
            "run",
            "tests.component.replay_app:make_node",
            "--log-level",
            "warning",
            "--dsn",
            TEST_DSN,
            "--schema",
            backend.schema,
            "--node-id",
            node_id,
        )
        for node_id in ("n1", "n2", "n3")
    }
    try:
        await publish(5)

        async def spread() -> bool:
            holdings = await backend.subscriptions.list(group="totals")
            held = {h.node_id for h in holdings if h.state.value == "assigned"}
            return len(holdings) == PARTITIONS and held == set(nodes)

        await wait_for(spread, 60, "the partitions to spread over three nodes")

        async def caught_up() -> bool:
            return await applied() == published

        await wait_for(caught_up, 60, "the first build")
        publishing = asyncio.create_task(publish(5))
        reset = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "eventmill",
                "reset",
                "totals",
                "--to-start",
                "--dsn",
                TEST_DSN,
                "--schema",
                backend.schema,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert reset.returncode == 0, reset.stderr
        assert len(reset.stdout.splitlines()) == PARTITIONS
        await publishing

        async def replayed() -> bool:
            checkpoints = await backend.checkpoints.list("totals")
            return (
                await applied() == published
                and len(checkpoints) == PARTITIONS
                and not any(c.reset_pending for c in checkpoints)
            )

        await wait_for(replayed, 60, "the replay")
        resets = await rows(backend, "SELECT source_key, after_place FROM {schema}.resets")
        assert len(resets) == PARTITIONS
        assert len({key for key, _ in resets}) == PARTITIONS
        assert {after for _, after in resets} == {None}
        projection = await rows(
            backend, "SELECT stream, events, amount FROM {schema}.order_totals ORDER BY stream"
        )
        scratch = await rows(
            backend,
            "SELECT stream, count(*), sum((payload->>'amount')::bigint) FROM {schema}.events"
            " WHERE category = 'orders' GROUP BY stream ORDER BY stream",
        )
        assert projection == scratch
        assert sum(count for _, count, _ in projection) == published == STREAMS * 10
        assert all(process.poll() is None for process in nodes.values()), "a node exited"
    finally:
        for process in nodes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        ended = {node_id: process.communicate(timeout=30) for node_id, process in nodes.items()}
    for node_id, process in nodes.items():
        _, stderr = ended[node_id]
        assert process.returncode == 0, f"{node_id}: {stderr}"
        assert "Traceback" not in stderr and "ConflictError" not in stderr, f"{node_id}: {stderr}"

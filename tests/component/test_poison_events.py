"""Poison events on PostgreSQL with three node processes (``eventmill run
tests.component.poison_app:make_node``): a category of 200 streams in 16 partitions;
group ``totals`` fails on one event of each of two streams, group ``audit`` never
fails. Every other event is applied exactly once by both groups while the two streams
retry and park; the node holding one of them is SIGKILLed and the stream stays parked
on the new holder (later events are held, not applied). After the fix, ``eventmill
parked retry`` applies the held events of one stream in order, exactly once; ``eventmill
parked skip --through`` records the poison event of the other as skipped and applies
the rest in order. No surviving node exits or prints a traceback."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from eventmill.backends.postgres import PostgresBackend
from eventmill.events import CategoryPartitionIdentifier, NewEvent, StreamIdentifier, stream_hash
from eventmill.store import EventStore
from tests.component.poison_app import PARTITIONS, TABLES
from tests.postgres_support import TEST_DSN, drop_schema, unique_schema_name

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
STREAMS = 200
RETRIED = "order-17"
SKIPPED = "order-42"


def start_node(schema: str, node_id: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "eventmill",
            "run",
            "tests.component.poison_app:make_node",
            "--dsn",
            TEST_DSN,
            "--schema",
            schema,
            "--node-id",
            node_id,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def eventmill(schema: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventmill", *arguments, "--dsn", TEST_DSN, "--schema", schema],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


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


async def rows(backend: PostgresBackend, query: str, *parameters: Any) -> list[tuple[Any, ...]]:
    async with backend.connection() as connection:
        cursor = await connection.execute(backend.sql(query), parameters)
        return await cursor.fetchall()


async def test_poison_events_park_move_with_the_source_and_recover(
    backend: PostgresBackend,
) -> None:
    store = EventStore(backend)
    rounds = 0

    async def publish_round() -> None:
        nonlocal rounds

        async def publish(stream: int) -> None:
            name = f"order-{stream}"
            poison = rounds == 1 and name in (RETRIED, SKIPPED)
            await store.stream(category="orders", stream=name).publish(
                [NewEvent(name="order-placed", payload={"poison": poison})]
            )

        for start in range(0, STREAMS, 3):  # as many at once as the pool has connections
            await asyncio.gather(*(publish(s) for s in range(start, min(start + 3, STREAMS))))
        rounds += 1

    async def applied(group: str) -> list[tuple[str, int]]:
        found = await rows(
            backend,
            "SELECT stream, position FROM {schema}.applied WHERE group_name = %s",
            group,
        )
        return [(stream, position) for stream, position in found]

    async def applied_in_order(group: str, stream: str) -> list[int]:
        found = await rows(
            backend,
            "SELECT position FROM {schema}.applied WHERE group_name = %s AND stream = %s"
            " ORDER BY id",
            group,
            stream,
        )
        return [position for (position,) in found]

    def expected(exclude: dict[str, int]) -> list[tuple[str, int]]:
        """Every (stream, position) published, but positions >= exclude[stream]."""
        return sorted(
            (f"order-{s}", p)
            for s in range(STREAMS)
            for p in range(rounds)
            if p < exclude.get(f"order-{s}", rounds)
        )

    nodes = {node_id: start_node(backend.schema, node_id) for node_id in ("n1", "n2", "n3")}
    killed: str | None = None
    try:
        for _ in range(2):
            await publish_round()

        async def parked_and_flowing() -> bool:
            records = await backend.parked.list(group="totals")
            return (
                sorted(await applied("totals")) == expected({RETRIED: 1, SKIPPED: 1})
                and sorted(await applied("audit")) == expected({})
                and sorted((r.stream.stream, r.held) for r in records)
                == [(RETRIED, 1), (SKIPPED, 1)]
            )

        await wait_for(parked_and_flowing, 60, "the poison streams to park, the rest to flow")
        records = {r.stream.stream: r for r in await backend.parked.list(group="totals")}
        retried = records[RETRIED]
        assert (retried.position, retried.attempts, retried.error_type) == (1, 3, "ValueError")
        assert "cannot total order-17" in retried.error_message and "Traceback" in retried.traceback
        listing = asyncio.create_task(
            asyncio.to_thread(eventmill, backend.schema, "parked", "list", "--group", "totals")
        )

        partition = stream_hash(RETRIED) % PARTITIONS
        source = CategoryPartitionIdentifier("orders", partition, PARTITIONS)
        assert retried.source == source
        [holding] = [
            h for h in await backend.subscriptions.list(group="totals") if h.source == source
        ]
        assert holding.node_id is not None
        killed = holding.node_id
        nodes[killed].send_signal(signal.SIGKILL)
        nodes[killed].wait(timeout=30)
        await publish_round()
        listed = await listing
        assert listed.returncode == 0 and f"orders/{RETRIED}" in listed.stdout, listed.stderr

        async def moved_and_still_held() -> bool:
            holdings = await backend.subscriptions.list(group="totals")
            holder = [
                h.node_id for h in holdings if h.source == source and h.state.value == "assigned"
            ]
            records = {r.stream.stream: r.held for r in await backend.parked.list(group="totals")}
            return (
                holder not in ([killed], [])
                and sorted(await applied("totals")) == expected({RETRIED: 1, SKIPPED: 1})
                and sorted(await applied("audit")) == expected({})
                and records == {RETRIED: 2, SKIPPED: 2}
            )

        await wait_for(moved_and_still_held, 60, "the partition to move, still parked")

        async with backend.connection() as connection:
            await connection.execute(
                backend.sql("INSERT INTO {schema}.fixed VALUES (%s)"), (RETRIED,)
            )
        poison = (await EventStore(backend).stream(category="orders", stream=SKIPPED).read())[1]
        assert poison.payload["poison"] is True
        retry, skip = await asyncio.gather(
            asyncio.to_thread(
                eventmill, backend.schema, "parked", "retry", "totals", f"orders/{RETRIED}"
            ),
            asyncio.to_thread(
                eventmill,
                backend.schema,
                "parked",
                "skip",
                "totals",
                f"orders/{SKIPPED}",
                "--through",
                str(poison.sequence_number),
            ),
        )
        assert retry.returncode == 0, retry.stderr
        assert skip.returncode == 0, skip.stderr

        async def recovered() -> bool:
            everything = expected({})
            return (
                await backend.parked.list() == []
                and sorted(await applied("totals")) == [e for e in everything if e != (SKIPPED, 1)]
                and sorted(await applied("audit")) == everything
            )

        await wait_for(recovered, 60, "the retry and the skip")
        assert await applied_in_order("totals", RETRIED) == [0, 1, 2]
        assert await applied_in_order("totals", SKIPPED) == [0, 2]
        [skipped] = await backend.parked.skipped(group="totals")
        assert (skipped.stream, skipped.position, skipped.reason) == (
            StreamIdentifier("orders", SKIPPED),
            1,
            "operator",
        )
        survivors = {n: p for n, p in nodes.items() if n != killed}
        assert all(p.poll() is None for p in survivors.values()), "a node exited"
    finally:
        for process in nodes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        ended = {node_id: process.communicate(timeout=30) for node_id, process in nodes.items()}
    for node_id, process in nodes.items():
        if node_id == killed:
            continue
        _, stderr = ended[node_id]
        assert process.returncode == 0, f"{node_id}: {stderr}"
        assert "Traceback" not in stderr, f"{node_id}: {stderr}"

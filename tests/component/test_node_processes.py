"""Real node processes on PostgreSQL, started with ``eventmill run``: one COORDINATOR and
two OBSERVERs; events published throughout; one observer SIGKILLed and restarted.
Every event is processed exactly once per group (the recorders write in the checkpoint
transaction), and ``eventmill status --json`` agrees with what the processes did."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from eventmill.backends.postgres import PostgresBackend
from eventmill.events import NewEvent, StreamIdentifier, identifier_from_json
from eventmill.store import EventStore
from tests.component.node_app import TABLE
from tests.postgres_support import TEST_DSN, connect, drop_schema, unique_schema_name

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
STREAMS = [f"order-{n}" for n in range(8)]
GROUPS = ("totals", "audit")


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    name = unique_schema_name()
    result = eventmill("migrate", "--dsn", TEST_DSN, "--schema", name)
    assert result.returncode == 0, result.stderr
    async with await connect() as connection:
        await connection.execute(sql.SQL(TABLE.format(schema=sql.Identifier(name).as_string())))
    yield name
    await drop_schema(name)


def eventmill(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventmill", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


class Nodes:
    """The node processes of one test, by node id."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.processes: dict[str, subprocess.Popen[str]] = {}

    def start(self, node_id: str, mode: str) -> None:
        self.processes[node_id] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "eventmill",
                "run",
                "tests.component.node_app:make_node",
                "--log-level",
                "warning",
                "--dsn",
                TEST_DSN,
                "--schema",
                self.schema,
                "--mode",
                mode,
                "--node-id",
                node_id,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def kill(self, node_id: str) -> None:
        process = self.processes.pop(node_id)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        process.communicate()

    def stop_all(self) -> dict[str, tuple[int, str]]:
        """SIGTERM every node; their exit codes and stderr."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        ended = {}
        for node_id, process in self.processes.items():
            try:
                _, stderr = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                _, stderr = process.communicate()
            ended[node_id] = (process.returncode, stderr)
        self.processes.clear()
        return ended


async def wait_for(condition: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Await ``condition()`` until true, at most ``within`` s (it reads the database, so
    there is nothing to wait on but time)."""
    try:
        async with asyncio.timeout(within):
            while not await condition():  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def test_coordinator_and_observers_with_a_killed_observer(schema: str) -> None:
    backend = await PostgresBackend.connect(TEST_DSN, schema=schema, max_size=2)
    store = EventStore(backend)
    nodes = Nodes(schema)
    published: list[str] = []

    async def publish(count: int) -> None:
        for _ in range(count):
            stream = STREAMS[len(published) % len(STREAMS)]
            stored = await store.stream(category="orders", stream=stream).publish(
                [NewEvent(name="order-placed", payload={"n": len(published)})]
            )
            published.extend(event.id for event in stored)

    async def processed() -> dict[str, list[tuple[str, str, str]]]:
        async with await connect() as connection:
            rows = await (
                await connection.execute(
                    sql.SQL(
                        "SELECT group_name, event_id, node_id, stream FROM {}.processed"
                    ).format(sql.Identifier(schema))
                )
            ).fetchall()
        found: dict[str, list[tuple[str, str, str]]] = {group: [] for group in GROUPS}
        for group, event_id, node_id, stream in rows:
            found[group].append((event_id, node_id, stream))
        return found

    async def holders() -> set[str]:
        return {
            h.node_id
            for h in await backend.subscriptions.list()
            if h.node_id is not None and h.state.value == "assigned"
        }

    async def everything_processed() -> bool:
        found = await processed()
        return all(len(found[group]) >= len(published) for group in GROUPS)

    try:
        nodes.start("coordinator", "coordinator")
        nodes.start("o1", "observer")
        nodes.start("o2", "observer")
        await publish(100)

        async def both_hold() -> bool:
            return await holders() == {"o1", "o2"}

        await wait_for(both_hold, 30, "both observers to hold sources")
        await publish(100)
        await wait_for(everything_processed, 30, "the first events to be processed")

        nodes.kill("o1")
        await publish(100)  # while o1's sources wait for its records to expire
        nodes.start("o1-restarted", "observer")

        async def restarted_holds() -> bool:
            return await holders() == {"o1-restarted", "o2"}

        await wait_for(restarted_holds, 30, "the restarted observer to hold sources")
        await publish(100)
        await wait_for(everything_processed, 30, "every event to be processed")

        found = await processed()
        for group in GROUPS:
            ids = [event_id for event_id, _, _ in found[group]]
            assert sorted(ids) == sorted(published), f"{group}: not exactly once"

        # One more event per stream: its processing node must be the holder that
        # `eventmill status --json` names for that stream's source.
        # The killed o1's node record counts as alive until it is max_age old.
        live = {"coordinator", "o1-restarted", "o2"}
        status: dict[str, Any] = {}

        async def status_agrees() -> bool:
            nonlocal status
            result = eventmill("status", "--dsn", TEST_DSN, "--schema", schema, "--json")
            assert result.returncode in (0, 1), result.stderr
            status = json.loads(result.stdout)
            alive = {n["node_id"] for n in status["nodes"] if n["alive"]}
            return alive == live and result.returncode == 0

        await wait_for(status_agrees, 30, "status to show exactly the live nodes, healthy")
        assert {s["node_id"] for s in status["sources"]} <= live
        held_by: dict[tuple[str, str], str] = {}
        for source in status["sources"]:
            assert source["state"] == "assigned"
            held_by[(source["group"], json.dumps(source["source"]))] = source["node_id"]
        assert len([k for k in held_by if k[0] == "totals"]) == 4
        assert len([k for k in held_by if k[0] == "audit"]) == 1
        last = len(published)
        await publish(len(STREAMS))
        await wait_for(everything_processed, 30, "the last events to be processed")
        found = await processed()
        new_ids = set(published[last:])  # rows come back in no particular order
        for group in GROUPS:
            new_rows = [row for row in found[group] if row[0] in new_ids]
            assert len(new_rows) == len(STREAMS)
            for _, node_id, stream in new_rows:
                matching = [
                    holder
                    for (g, key), holder in held_by.items()
                    if g == group and _contains(identifier_from_json(json.loads(key)), stream)
                ]
                assert matching == [node_id], (group, stream)
        assert len(published) == last + len(STREAMS)
    finally:
        ended = nodes.stop_all()
        await backend.close()
    for node_id, (code, stderr) in ended.items():
        assert code == 0, f"{node_id} exited with {code}: {stderr[-2000:]}"


def _contains(source: object, stream: str) -> bool:
    if isinstance(source, StreamIdentifier):
        return source.stream == stream
    contains = getattr(source, "contains", None)
    return True if contains is None else bool(contains(stream))

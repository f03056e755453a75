"""A woken zombie processes no event of a source that moved (DESIGN 4.5).

Three node processes on PostgreSQL (``tests/component/zombie_node.py``): a coordinator
and two observers, A and B, each with an at-least-once subscriber of one source that
takes 20 ms per event. A holds the source and SIGSTOPs itself in the middle of a pass,
right after recording event N; it is declared dead, the source moves to B, B begins
processing; then A gets SIGCONT. A's ownership lease expired while it was frozen, so
its pass ends before event N+1 (without the lease it would go on until its observer
withdrew the source or its checkpoint save was refused): A recorded exactly events
1..N, none after B's first, and B every later event exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from eventmill.backends.postgres import PostgresBackend
from eventmill.events import NewEvent
from eventmill.store import EventStore
from tests.component.zombie_node import TABLE
from tests.postgres_support import fresh_postgres_backend

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
EVENTS = 60
TIMEOUT = 30.0


@dataclass
class NodeProcess:
    node_id: str
    process: asyncio.subprocess.Process
    reports: list[dict[str, Any]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    def is_stopped(self) -> bool:
        """Whether the process is in the stopped state (SIGSTOP)."""
        with open(f"/proc/{self.process.pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "T"


class Cluster:
    """Node processes running ``module`` (``python -m module CONFIG_JSON``)."""

    def __init__(self, backend: PostgresBackend, module: str) -> None:
        self.backend = backend
        self.module = module
        self.nodes: list[NodeProcess] = []

    async def start(self, node_id: str, mode: str, freeze_at: int | None = None) -> NodeProcess:
        config = {
            "dsn": self.backend.pool.conninfo,
            "schema": self.backend.schema,
            "node_id": node_id,
            "mode": mode,
            "freeze_at": freeze_at,
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            json.dumps(config),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        node = NodeProcess(node_id, process)
        self.nodes.append(node)
        assert process.stdout is not None
        async with asyncio.timeout(TIMEOUT):
            assert (await process.stdout.readline()).strip() == b"ready"
        node.reader = asyncio.get_running_loop().create_task(self._read(node))
        return node

    async def _read(self, node: NodeProcess) -> None:
        assert node.process.stdout is not None
        async for line in node.process.stdout:
            node.reports.append(json.loads(line))

    async def stop_all(self) -> None:
        """SIGTERM every node; each must exit with 0."""
        for node in self.nodes:
            node.process.send_signal(signal.SIGCONT)
            node.process.terminate()
        async with asyncio.timeout(TIMEOUT):
            codes = [await node.process.wait() for node in self.nodes]
        assert codes == [0] * len(self.nodes)

    async def kill_all(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError):
                node.process.kill()
            await node.process.wait()
            if node.reader is not None:
                await node.reader


@contextlib.asynccontextmanager
async def cluster_of(
    backend: PostgresBackend, module: str = "tests.component.zombie_node"
) -> AsyncIterator[Cluster]:
    cluster = Cluster(backend, module)
    try:
        yield cluster
    finally:
        await cluster.kill_all()


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def rows(backend: PostgresBackend) -> list[tuple[int, str, int, Any]]:
    async with backend.connection() as connection:
        cursor = await connection.execute(
            backend.sql(
                "SELECT sequence_number, node_id, epoch, at FROM {schema}.zombie_processed"
                " ORDER BY at"
            )
        )
        return list(await cursor.fetchall())


async def publish(backend: PostgresBackend, count: int) -> None:
    stream = EventStore(backend).stream(category="orders", stream="order-1")
    await stream.publish([NewEvent(name="placed", payload={"n": n}) for n in range(count)])


@pytest.mark.parametrize("freeze_at", [5, 11, 17])
async def test_a_woken_zombie_processes_no_event_of_a_source_that_moved(freeze_at: int) -> None:
    async with fresh_postgres_backend(max_size=2) as backend:
        async with backend.connection() as connection:
            await connection.execute(backend.sql(TABLE))
        await publish(backend, 1)

        async def processed_by(node_id: str, at_least: int = 1) -> bool:
            return sum(row[1] == node_id for row in await rows(backend)) >= at_least

        async with cluster_of(backend) as cluster:
            await cluster.start("coordinator", "coordinator")
            a = await cluster.start("a", "observer", freeze_at=freeze_at)
            await wait_for(lambda: processed_by("a"), "A to hold the source")
            await cluster.start("b", "observer")
            await publish(backend, EVENTS - 1)

            async def a_is_frozen() -> bool:
                return a.is_stopped()

            await wait_for(a_is_frozen, "A to freeze itself mid-pass")
            await wait_for(lambda: processed_by("b", 3), "B to take the source over")
            thawed_at = time.time()
            a.process.send_signal(signal.SIGCONT)

            async def a_caught_up() -> bool:
                latest = [r for r in a.reports if r["time"] > thawed_at]
                return any(r["lease_valid"] and not r["held"] for r in latest)

            await wait_for(a_caught_up, "A to renew its lease and drop the source")

            async def all_processed() -> bool:
                return {row[0] for row in await rows(backend)} == set(range(1, EVENTS + 1))

            await wait_for(all_processed, "every event to be processed")
            await cluster.stop_all()

        recorded = await rows(backend)
        by_a = [row for row in recorded if row[1] == "a"]
        by_b = [row for row in recorded if row[1] == "b"]
        assert [row[0] for row in by_a] == list(range(1, freeze_at + 1))
        b_began = by_b[0][3]
        assert [row for row in by_a if row[3] > b_began] == []
        first = by_b[0][0]
        assert first <= freeze_at + 1
        assert [row[0] for row in by_b] == list(range(first, EVENTS + 1))
        assert max(row[2] for row in by_a) < min(row[2] for row in by_b)

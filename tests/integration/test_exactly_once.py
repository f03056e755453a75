"""Exactly-once on PostgreSQL: a transactional processor's rows and the checkpoint
commit together, so a worker SIGKILLed at random points, again and again, still ends
with each of 10,000 events applied exactly once."""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from pathlib import Path

import pytest
from psycopg import sql

from eventmill import NewEvent
from eventmill.store import EventStore
from tests.postgres_support import TEST_DSN, connect, fresh_postgres_backend

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
EVENTS = 10_000
KILLS = 25


async def start_worker(schema: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.exactly_once_worker",
        TEST_DSN,
        schema,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )


async def test_sigkilled_workers_apply_each_event_exactly_once() -> None:
    chooser = random.Random()
    async with fresh_postgres_backend() as backend:
        schema = sql.Identifier(backend.schema)
        async with await connect() as connection:
            await connection.execute(
                sql.SQL("CREATE TABLE {}.applied (sequence_number bigint NOT NULL)").format(schema)
            )
        store = EventStore(backend)
        for batch in range(EVENTS // 100):
            await store.stream(category="work", stream=f"s{batch % 7}").publish(
                [NewEvent(name="job", payload={"n": n}) for n in range(100)]
            )
        kills = 0
        drained = False
        while not drained:
            worker = await start_worker(backend.schema)
            assert worker.stdout is not None
            batches_before_kill = chooser.randint(1, 8) if kills < KILLS else None
            seen = 0
            async with asyncio.timeout(60):
                while True:
                    line = await worker.stdout.readline()
                    if not line:
                        break
                    if line.startswith(b"drained"):
                        drained = True
                        continue
                    seen += 1
                    if batches_before_kill is not None and seen >= batches_before_kill:
                        if chooser.random() < 0.5:
                            await asyncio.sleep(chooser.random() * 0.01)  # a random kill point
                        worker.send_signal(signal.SIGKILL)
                        kills += 1
                        break
                code = await worker.wait()
            if batches_before_kill is None or drained:
                assert code == 0
        assert kills >= KILLS
        async with await connect() as connection:
            cursor = await connection.execute(
                sql.SQL("SELECT count(*), count(DISTINCT sequence_number) FROM {}.applied").format(
                    schema
                )
            )
            assert await cursor.fetchone() == (EVENTS, EVENTS)
            cursor = await connection.execute(
                sql.SQL(
                    "SELECT count(*) FROM {s}.applied a JOIN {s}.events e USING (sequence_number)"
                ).format(s=schema)
            )
            assert await cursor.fetchone() == (EVENTS,)
        checkpoint = (await backend.checkpoints.list("exactly-once"))[0]
        last = await store.category("work").latest()
        assert last is not None and checkpoint.after == last.sequence_number

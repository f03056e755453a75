"""A drain SIGKILLed at random points on PostgreSQL (checkpoint saves in flight while
the next events are processed): after each kill the stored checkpoint is at most twice
``checkpoint_every`` events behind the last event processed, and the workers together
process every event, each one resuming exactly after the stored checkpoint."""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from pathlib import Path

import pytest
from psycopg.conninfo import make_conninfo

from eventmill import CategoryIdentifier, NewEvent
from eventmill.store import EventStore
from tests.integration.drain_crash_worker import EVERY
from tests.postgres_support import TEST_DSN, connect, fresh_postgres_backend

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
EVENTS = 4_000
KILLS = 8


async def sessions_gone(application_name: str) -> None:
    """Return once the server has no session named ``application_name`` left: a killed
    worker's statement that had reached the server (a checkpoint save) has then committed
    or rolled back, so the stored checkpoint is final."""
    async with await connect() as connection:
        while True:
            cursor = await connection.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                (application_name,),
            )
            row = await cursor.fetchone()
            if row == (0,):
                return
            await asyncio.sleep(0.01)  # polling the server's view; nothing to wait on


async def test_a_killed_drain_replays_at_most_twice_the_interval_and_skips_nothing() -> None:
    chooser = random.Random()
    async with fresh_postgres_backend() as backend:
        store = EventStore(backend)
        for batch in range(EVENTS // 500):
            await store.stream(category="drain", stream=f"s{batch % 3}").publish(
                [NewEvent(name="job", payload={"n": n}) for n in range(500)]
            )
        name = f"drain-crash-{backend.schema}"
        dsn = make_conninfo(TEST_DSN, application_name=name)
        processed: set[int] = set()
        kills = 0
        while True:
            checkpoint = await backend.checkpoints.get("drain", CategoryIdentifier("drain"))
            resume_after = 0 if checkpoint is None or checkpoint.after is None else checkpoint.after
            worker = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.integration.drain_crash_worker",
                dsn,
                backend.schema,
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
            )
            assert worker.stdout is not None
            left = EVENTS - resume_after
            kill_after = chooser.randint(1, max(1, left // 4)) if kills < KILLS else None
            seen: list[int] = []
            drained = False
            async with asyncio.timeout(60):
                while line := await worker.stdout.readline():
                    if line.startswith(b"drained"):
                        drained = True
                        continue
                    seen.append(int(line))
                    if kill_after is not None and len(seen) == kill_after:
                        worker.send_signal(signal.SIGKILL)
                        kills += 1
                code = await worker.wait()
            # Each worker starts exactly after the stored checkpoint and goes in order.
            assert seen == list(range(resume_after + 1, resume_after + 1 + len(seen)))
            processed.update(seen)
            if drained:
                assert code == 0 or kill_after is not None  # a kill may land after the end
                break
            assert code == -signal.SIGKILL
            await sessions_gone(name)
            stored = await backend.checkpoints.get("drain", CategoryIdentifier("drain"))
            after = 0 if stored is None or stored.after is None else stored.after
            assert after <= seen[-1]  # never ahead of what was processed
            assert seen[-1] - after <= 2 * EVERY  # the documented replay bound
        assert kills >= KILLS - 1
        assert processed == set(range(1, EVENTS + 1))
        final = await backend.checkpoints.get("drain", CategoryIdentifier("drain"))
        assert final is not None and final.after == EVENTS

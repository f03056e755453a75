"""PostgreSQL advisory locks: loss when the connection dies, contention between
backends, stable keys, and connections that never sit idle in a transaction."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from eventmill import InvalidSettingsError
from eventmill.backends.postgres import PostgresBackend
from eventmill.backends.postgres.locks import PostgresLockManager, lock_key
from tests.postgres_support import TEST_DSN, connect, fresh_postgres_backend

pytestmark = pytest.mark.postgres

FAST = timedelta(milliseconds=100)


@asynccontextmanager
async def another_backend(schema: str) -> AsyncIterator[PostgresBackend]:
    """A second backend on the same schema, with a pool of its own (another process)."""
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        TEST_DSN, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
    )
    await pool.open(wait=True)
    try:
        yield PostgresBackend(pool, schema=schema)
    finally:
        await pool.close()


async def session_state(pid: int) -> str | None:
    async with await connect() as connection:
        cursor = await connection.execute(
            "SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)
        )
        row = await cursor.fetchone()
    return None if row is None else str(row[0])


def test_lock_keys_are_stable_and_depend_on_schema_and_name() -> None:
    assert lock_key("eventmill", "coordinator") == lock_key("eventmill", "coordinator")
    assert lock_key("eventmill", "coordinator") == -5315115994892823924
    assert lock_key("other", "coordinator") != lock_key("eventmill", "coordinator")
    assert lock_key("eventmill", "coordinator2") != lock_key("eventmill", "coordinator")
    assert -(2**63) <= lock_key("a", "b") < 2**63


async def test_a_killed_lock_connection_is_noticed_and_the_lock_taken_over() -> None:
    async with fresh_postgres_backend() as first, another_backend(first.schema) as second:
        mine = PostgresLockManager(first, check_interval=FAST)
        theirs = PostgresLockManager(second, check_interval=FAST)
        lock = await mine.try_lock("coordinator")
        assert lock is not None
        assert await theirs.try_lock("coordinator") is None
        watching = asyncio.create_task(lock.wait_lost())
        waiting = asyncio.create_task(theirs.wait_for_lock("coordinator", timedelta(minutes=1)))
        async with await connect() as killer:
            cursor = await killer.execute("SELECT pg_terminate_backend(%s)", (lock.backend_pid,))
            assert await cursor.fetchone() == (True,)
        await asyncio.wait_for(watching, 30)
        assert not lock.is_held
        successor = await asyncio.wait_for(waiting, 30)
        assert successor is not None and successor.is_held
        assert successor.backend_pid != lock.backend_pid
        assert await mine.try_lock("coordinator") is None
        await lock.release()  # harmless after the loss
        await successor.release()
        retaken = await mine.try_lock("coordinator")
        assert retaken is not None
        await retaken.release()


async def test_exactly_one_of_many_contenders_wins() -> None:
    async with fresh_postgres_backend() as first, another_backend(first.schema) as second:
        managers = [PostgresLockManager(first), PostgresLockManager(second)] * 4
        for _ in range(5):
            results = await asyncio.gather(*(m.try_lock("leader") for m in managers))
            winners = [lock for lock in results if lock is not None]
            assert len(winners) == 1
            await winners[0].release()


async def test_the_lock_connection_is_idle_not_in_a_transaction_and_freed_on_release() -> None:
    async with fresh_postgres_backend() as backend:
        lock = await backend.locks.try_lock("leader")
        assert lock is not None
        assert await session_state(lock.backend_pid) == "idle"
        await lock.release()
        deadline = time.monotonic() + 10
        while await session_state(lock.backend_pid) is not None:  # the server ends it soon
            assert time.monotonic() < deadline, "the lock's session outlived its release"
            await asyncio.sleep(0.01)
        other = await backend.locks.try_lock("leader")
        assert other is not None
        await other.release()


async def test_schemas_do_not_share_locks() -> None:
    async with fresh_postgres_backend() as one, fresh_postgres_backend() as two:
        first = await one.locks.try_lock("leader")
        second = await two.locks.try_lock("leader")
        assert first is not None and second is not None
        await first.release()
        await second.release()


async def test_bad_settings_are_refused() -> None:
    async with fresh_postgres_backend() as backend:
        with pytest.raises(InvalidSettingsError):
            PostgresLockManager(backend, check_interval=timedelta(0))
        with pytest.raises(InvalidSettingsError):
            PostgresLockManager(backend, max_poll_interval=timedelta(seconds=-1))

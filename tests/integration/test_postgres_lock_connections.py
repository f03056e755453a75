"""PostgreSQL lock attempts reuse one standby connection per event loop instead of
opening one each: the winner keeps its connection as the lock's, a dead standby is
replaced, and closing the backend (or dropping the manager) closes the standby."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
from psycopg import AsyncConnection
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

from eventmill.backends.postgres import PostgresBackend
from eventmill.backends.postgres.locks import PostgresLockManager
from tests.postgres_support import TEST_DSN, connect, fresh_postgres_backend

pytestmark = pytest.mark.postgres

Session = tuple[int, datetime]


@asynccontextmanager
async def named_backend(schema: str) -> AsyncIterator[tuple[PostgresBackend, str]]:
    """A backend on ``schema`` whose connections carry a unique application_name,
    with that name; its pool has one connection, which never tries for a lock."""
    name = f"eventmill-test-{uuid.uuid4().hex[:12]}"
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        make_conninfo(TEST_DSN, application_name=name),
        min_size=1,
        max_size=1,
        kwargs={"autocommit": True},
        open=False,
    )
    await pool.open(wait=True)
    backend = PostgresBackend(pool, schema=schema)
    try:
        yield backend, name
    finally:
        await backend.close()
        await pool.close()


async def lock_sessions(observer: AsyncConnection[Any], name: str) -> set[Session]:
    """The open sessions of application ``name`` whose last statement tried a lock."""
    cursor = await observer.execute(
        "SELECT pid, backend_start FROM pg_stat_activity"
        " WHERE application_name = %s AND query LIKE 'SELECT pg_try_advisory_lock(%%'",
        (name,),
    )
    return {(int(pid), start) for pid, start in await cursor.fetchall()}


async def wait_until(condition: Callable[[], Awaitable[bool]], seconds: float = 20.0) -> None:
    """Return once ``condition()`` holds; fail the test after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not await condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.01)


async def test_fifty_failed_attempts_use_one_connection() -> None:
    async with (
        fresh_postgres_backend() as holder,
        named_backend(holder.schema) as (standby, name),
        await connect() as observer,
    ):
        held = await holder.locks.try_lock("coordinator")
        assert held is not None
        seen: set[Session] = set()
        for _ in range(50):
            assert await standby.locks.try_lock("coordinator") is None
            seen |= await lock_sessions(observer, name)
        assert len(seen) == 1
        assert await lock_sessions(observer, name) == seen  # still open, kept for later
        await held.release()


async def test_the_winner_keeps_the_standby_and_a_new_one_is_opened_after() -> None:
    async with (
        fresh_postgres_backend() as holder,
        named_backend(holder.schema) as (standby, name),
        await connect() as observer,
    ):
        held = await holder.locks.try_lock("coordinator")
        assert held is not None
        assert await standby.locks.try_lock("coordinator") is None
        first = await lock_sessions(observer, name)
        ((first_pid, _),) = first
        await held.release()
        lock = await standby.locks.wait_for_lock(
            "coordinator", timedelta(seconds=5), lease=timedelta(seconds=30)
        )
        assert lock is not None and lock.backend_pid == first_pid
        assert await holder.locks.try_lock("coordinator") is None
        await lock.release()  # the server ends the session a moment later
        held = await holder.locks.wait_for_lock("coordinator", timedelta(seconds=10))
        assert held is not None
        assert await standby.locks.try_lock("coordinator") is None
        second = await lock_sessions(observer, name)
        assert len(second) == 1 and second != first
        await held.release()


async def test_a_dead_standby_is_replaced_within_the_attempt() -> None:
    async with (
        fresh_postgres_backend() as holder,
        named_backend(holder.schema) as (standby, name),
        await connect() as observer,
    ):
        held = await holder.locks.try_lock("coordinator")
        assert held is not None
        assert await standby.locks.try_lock("coordinator") is None
        first = await lock_sessions(observer, name)
        ((pid, _),) = first
        cursor = await observer.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert await cursor.fetchone() == (True,)

        async def gone() -> bool:
            return not await lock_sessions(observer, name)

        await wait_until(gone)
        assert await standby.locks.try_lock("coordinator") is None  # no error
        replaced = await lock_sessions(observer, name)
        assert len(replaced) == 1 and replaced != first
        await held.release()


async def test_closing_the_backend_or_dropping_a_manager_closes_the_standby() -> None:
    async with (
        fresh_postgres_backend() as holder,
        named_backend(holder.schema) as (standby, name),
        await connect() as observer,
    ):

        async def none_open() -> bool:
            return not await lock_sessions(observer, name)

        held = await holder.locks.try_lock("coordinator")
        assert held is not None
        manager = PostgresLockManager(standby)
        assert await manager.try_lock("coordinator") is None
        assert len(await lock_sessions(observer, name)) == 1
        del manager
        gc.collect()
        await wait_until(none_open)

        assert await standby.locks.try_lock("coordinator") is None
        assert len(await lock_sessions(observer, name)) == 1
        await standby.close()
        await wait_until(none_open)
        await held.release()

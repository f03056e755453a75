"""The LockManager contract, run against every backend."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from eventmill import InvalidIdentifierError, InvalidSettingsError
from eventmill.backends.base import Backend, Lock
from eventmill.backends.memory import InMemoryBackend
from eventmill.backends.postgres.locks import PostgresLock
from tests.postgres_support import connect

LONG = timedelta(seconds=30)


async def break_lock(backend: Backend, lock: Lock) -> None:
    """Make ``lock`` lost the way each backend can lose one."""
    if isinstance(backend, InMemoryBackend):
        backend.locks.break_lock(lock.name)
        return
    assert isinstance(lock, PostgresLock)
    async with await connect() as connection:
        await connection.execute("SELECT pg_terminate_backend(%s)", (lock.backend_pid,))


async def test_a_held_lock_is_refused_to_everyone_until_released(backend: Backend) -> None:
    locks = backend.locks
    first = await locks.try_lock("leader")
    assert first is not None and first.is_held and first.name == "leader"
    assert await locks.try_lock("leader") is None
    other = await locks.try_lock("other")
    assert other is not None
    await first.release()
    assert not first.is_held
    await first.release()  # harmless
    again = await locks.try_lock("leader")
    assert again is not None and again.is_held
    assert other.is_held
    await again.release()
    await other.release()


async def test_async_with_releases(backend: Backend) -> None:
    lock = await backend.locks.try_lock("leader")
    assert lock is not None
    async with lock as held:
        assert held is lock and await backend.locks.try_lock("leader") is None
    assert not lock.is_held
    taken = await backend.locks.try_lock("leader")
    assert taken is not None
    await taken.release()


async def test_wait_for_lock_times_out_while_held(backend: Backend) -> None:
    holder = await backend.locks.try_lock("leader")
    assert holder is not None
    assert await backend.locks.wait_for_lock("leader", timedelta(milliseconds=50)) is None
    assert await backend.locks.wait_for_lock("leader", timedelta(0)) is None
    assert holder.is_held
    await holder.release()


@pytest.mark.parametrize("limit", [timedelta(0), LONG, timedelta(days=36_500)])
async def test_wait_for_lock_takes_a_free_lock_at_once_whatever_the_timeout(
    backend: Backend, limit: timedelta
) -> None:
    lock = await backend.locks.wait_for_lock("leader", limit)
    assert lock is not None and lock.is_held
    await lock.release()


@pytest.mark.parametrize("limit", [LONG, timedelta(days=36_500)])
async def test_wait_for_lock_gets_the_lock_once_released(
    backend: Backend, limit: timedelta
) -> None:
    holder = await backend.locks.try_lock("leader")
    assert holder is not None
    waiting = asyncio.create_task(backend.locks.wait_for_lock("leader", limit))
    await asyncio.sleep(0)  # let it start (the outcome does not depend on it)
    assert not waiting.done()
    await holder.release()
    lock = await asyncio.wait_for(waiting, LONG.total_seconds())
    assert lock is not None and lock.is_held
    await lock.release()


async def test_wait_lost_returns_once_released(backend: Backend) -> None:
    lock = await backend.locks.try_lock("leader")
    assert lock is not None
    watching = asyncio.create_task(lock.wait_lost())
    await asyncio.sleep(0)
    assert not watching.done()
    await lock.release()
    await asyncio.wait_for(watching, LONG.total_seconds())
    await asyncio.wait_for(lock.wait_lost(), LONG.total_seconds())  # and at once afterwards


async def test_a_lost_lock_is_reported_to_its_holder_and_free_for_others(
    backend: Backend,
) -> None:
    lock = await backend.locks.try_lock("leader")
    assert lock is not None
    watching = asyncio.create_task(lock.wait_lost())
    await break_lock(backend, lock)
    await asyncio.wait_for(watching, LONG.total_seconds())
    assert not lock.is_held
    successor = await backend.locks.wait_for_lock("leader", LONG)
    assert successor is not None and successor.is_held
    await lock.release()  # harmless, and does not free the successor's lock
    assert successor.is_held
    assert await backend.locks.try_lock("leader") is None
    await successor.release()


async def test_bad_names_and_timeouts_are_refused(backend: Backend) -> None:
    with pytest.raises(InvalidIdentifierError):
        await backend.locks.try_lock("")
    with pytest.raises(InvalidIdentifierError):
        await backend.locks.wait_for_lock("x" * 256, LONG)
    with pytest.raises(InvalidSettingsError):
        await backend.locks.wait_for_lock("leader", timedelta(seconds=-1))
    with pytest.raises(InvalidSettingsError):
        await backend.locks.wait_for_lock("leader", 5)  # type: ignore[arg-type]

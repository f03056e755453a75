"""Frozen holders on PostgreSQL: a leased lock whose holder stops checking it (as a
frozen process does) is dropped by the server and taken by another; a lock that is
checked stays held; a fence gives up on a checkpoint row another transaction holds
locked, and the coordinator assigns the other sources meanwhile."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from eventmill.broker.coordinator import EventSubscriptionCoordinator
from eventmill.errors import ConflictError, InvalidSettingsError
from eventmill.events import StreamIdentifier, source_key
from tests.postgres_support import fresh_postgres_backend
from tests.unit.broker.test_singleton import FakeSubscriber

pytestmark = pytest.mark.postgres

LEASE = timedelta(milliseconds=300)


async def test_a_leased_lock_nobody_checks_is_dropped_and_taken_by_another() -> None:
    async with fresh_postgres_backend(max_size=2) as backend:
        frozen = await backend.locks.try_lock("leader", lease=LEASE)
        assert frozen is not None and frozen.is_held
        # nothing runs on the frozen holder's connection: the server ends its session
        taken = await backend.locks.wait_for_lock("leader", timedelta(seconds=30), lease=LEASE)
        assert taken is not None
        assert await frozen.confirm() is False
        assert frozen.is_held is False
        assert await taken.confirm() is True
        await taken.release()
        assert await taken.confirm() is False


async def test_a_leased_lock_whose_holder_checks_it_stays_held() -> None:
    async with fresh_postgres_backend(max_size=2) as backend:
        lock = await backend.locks.try_lock("leader", lease=LEASE)
        assert lock is not None
        watch = asyncio.create_task(lock.wait_lost())
        try:
            other = await backend.locks.wait_for_lock("leader", LEASE * 5)
            assert other is None
            assert lock.is_held and not watch.done()
        finally:
            await lock.release()
            await asyncio.wait_for(watch, timeout=10)
        with pytest.raises(InvalidSettingsError):
            await backend.locks.try_lock("leader", lease=timedelta(0))


async def test_a_fence_gives_up_on_a_locked_checkpoint_and_the_others_are_assigned() -> None:
    sources = (StreamIdentifier("orders", "o-1"), StreamIdentifier("orders", "o-2"))
    locked = sources[0]
    async with fresh_postgres_backend(max_size=4) as backend:
        for source in sources:
            await backend.checkpoints.save("g", source, 5, expected_version=None, epoch=0)
        async with backend.pool.connection() as holder, holder.transaction():
            # a holder frozen inside its batch transaction, after its checkpoint save
            await holder.execute(
                backend.sql(
                    "UPDATE {schema}.checkpoints SET after_place = 6"
                    " WHERE group_name = 'g' AND source_key = %s"
                ),
                (source_key(locked),),
            )
            with pytest.raises(ConflictError, match="locked"):
                await backend.checkpoints.fence("g", locked, 7)
            fenced = await backend.checkpoints.fence_all([("g", s, 1) for s in sources])
            assert fenced == [("g", locked, 1)]
            other = await backend.checkpoints.get("g", sources[1])
            assert other is not None and other.epoch == 1 and other.after == 5
            owners: dict[StreamIdentifier, str] = {}
            subscriber = FakeSubscriber("s1", owners, sources)  # type: ignore[arg-type]
            await backend.subscribers.register("g", "s1", "n1", sources)
            coordinator = EventSubscriptionCoordinator(backend)
            lock = await backend.locks.try_lock(coordinator.lock_name)
            assert lock is not None
            coordinator._take(lock)  # lead without running the loop
            try:
                await coordinator.coordinate()
                held = {h.source: h for h in await backend.subscriptions.list(group="g")}
                assert set(held) == {sources[1]}
                assert held[sources[1]].subscriber_id == subscriber.id
            finally:
                await coordinator._give_up()
        checkpoint = await backend.checkpoints.get("g", locked)
        assert checkpoint is not None and checkpoint.after == 6 and checkpoint.epoch == 0
        await backend.checkpoints.fence("g", locked, 7)
        checkpoint = await backend.checkpoints.get("g", locked)
        assert checkpoint is not None and checkpoint.epoch == 7


async def test_a_coordinator_woken_after_its_lease_ran_out_writes_nothing() -> None:
    source = StreamIdentifier("orders", "o-1")
    async with fresh_postgres_backend(max_size=3) as backend:
        await backend.subscribers.register("g", "s1", "n1", (source,))
        coordinator = EventSubscriptionCoordinator(backend, subscriber_max_age=LEASE * 10)
        lock = await backend.locks.try_lock(coordinator.lock_name, lease=LEASE)
        assert lock is not None
        coordinator._take(lock)
        coordinator._watch.cancel()  # type: ignore[union-attr]  # frozen: nothing checks
        successor = await backend.locks.wait_for_lock(
            coordinator.lock_name, timedelta(seconds=30), lease=LEASE
        )
        assert successor is not None
        try:
            assert coordinator.is_leader  # it does not know yet
            await coordinator.coordinate()
            assert not coordinator.is_leader
            assert await backend.subscriptions.list() == []
            assert await backend.checkpoints.list() == []
        finally:
            await coordinator._give_up()
            await successor.release()

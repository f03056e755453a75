"""A dead holder's source is taken over only if the holder is still dead when the
change commits (PostgreSQL, real row locks): the takeover locks the holder's record
(creating it dead when it was purged), so a heartbeat of that holder at that moment
waits and commits after it; a heartbeat that committed first makes the takeover a
revoke. The steps are ordered by held transactions and by watching ``pg_locks``
(through ``pg_blocking_pids``), never by sleeping."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from eventmill.backends.base import Assign, HoldingState, SourceHolding
from eventmill.backends.postgres import PostgresBackend
from eventmill.broker.coordinator import EventSubscriptionCoordinator
from eventmill.events import EventSourceIdentifier, StreamIdentifier, source_key
from tests.postgres_support import connect, fresh_postgres_backend

pytestmark = pytest.mark.postgres

X = StreamIdentifier("orders", "o-1")
Y = StreamIdentifier("orders", "o-2")
MINUTE = timedelta(minutes=1)


async def blocked_by(probe: psycopg.AsyncConnection[Any], pid: int) -> int:
    """The pid of the backend waiting for a lock ``pid`` holds (waits up to 20 s)."""
    deadline = time.monotonic() + 20
    while True:
        cursor = await probe.execute(
            "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", (pid,)
        )
        row = await cursor.fetchone()
        if row is not None:
            return int(row[0])
        assert time.monotonic() < deadline, f"nobody waits for backend {pid}"
        await asyncio.sleep(0.01)


async def set_up(backend: PostgresBackend, *, purged: bool) -> None:
    """X held by s1 on n1 at epoch 1; s1 last seen an hour ago (or purged)."""
    await backend.subscriptions.apply(
        [Assign(group="g", source=X, subscriber_id="s1", node_id="n1", epoch=1)]
    )
    await backend.subscribers.register("g", "s1", "n1", [X])
    await backend.subscribers.register("g", "t", "n2", [X])
    async with backend.connection() as connection:
        if purged:
            await connection.execute(
                backend.sql("DELETE FROM {schema}.subscribers WHERE subscriber_id = 's1'")
            )
        else:
            await connection.execute(
                backend.sql(
                    "UPDATE {schema}.subscribers SET last_seen = now() - interval '1 hour'"
                    " WHERE subscriber_id = 's1'"
                )
            )


def takeover(source: EventSourceIdentifier = X, epoch: int = 2, age: timedelta = MINUTE) -> Assign:
    """Give ``source`` to t, taking it from a holder judged dead by ``age``."""
    return Assign(
        group="g",
        source=source,
        subscriber_id="t",
        node_id="n2",
        epoch=epoch,
        holder_dead_after=age,
    )


@pytest.mark.parametrize("purged", [False, True], ids=["dead", "purged"])
async def test_a_heartbeat_during_a_takeover_waits_for_it_and_sees_the_move(
    purged: bool,
) -> None:
    async with fresh_postgres_backend(max_size=3) as backend:
        await set_up(backend, purged=purged)
        async with await connect() as blocker, await connect() as probe:
            blocker_pid = blocker.info.backend_pid
            # an uncommitted row for Y holds the takeover's transaction open just before
            # it commits, after it locked s1's record
            await blocker.execute("BEGIN")
            await blocker.execute(
                backend.sql(
                    "INSERT INTO {schema}.subscriptions (group_name, source_key, source,"
                    " epoch, state) VALUES ('g', %s, %s::jsonb, 1, 'released')"
                ),
                (source_key(Y), source_key(Y)),
            )
            apply = asyncio.create_task(backend.subscriptions.apply([takeover(), takeover(Y, 1)]))
            apply_pid = await blocked_by(probe, blocker_pid)
            heartbeat = asyncio.create_task(
                backend.subscribers.heartbeat_all("n1", [("g", "s1", [X])])
            )
            heartbeat_pid = await blocked_by(probe, apply_pid)  # the heartbeat waits for it
            assert heartbeat_pid != blocker_pid and not heartbeat.done()
            await blocker.execute("ROLLBACK")
            await asyncio.wait_for(apply, timeout=20)
            await asyncio.wait_for(heartbeat, timeout=20)
        # committed after the takeover: live again, and its observer sees X moved
        live = await backend.subscribers.list(max_age=MINUTE)
        assert sorted(record.id for record in live) == ["s1", "t"]
        assert await backend.subscriptions.list(node_id="n1") == []
        assert await backend.subscriptions.list() == [
            SourceHolding(
                group="g",
                source=source,
                subscriber_id="t",
                node_id="n2",
                epoch=epoch,
                state=HoldingState.ASSIGNED,
            )
            for source, epoch in ((X, 2), (Y, 1))
        ]


@pytest.mark.parametrize("purged", [False, True], ids=["dead", "purged"])
async def test_a_takeover_waits_for_a_heartbeat_in_progress_and_then_revokes(
    purged: bool,
) -> None:
    async with fresh_postgres_backend(max_size=3) as backend:
        await set_up(backend, purged=purged)
        async with await connect() as holder, await connect() as probe:
            holder_pid = holder.info.backend_pid
            # s1's heartbeat, in flight (written, not yet committed)
            await holder.execute("BEGIN")
            await holder.execute(
                backend.sql(
                    "INSERT INTO {schema}.subscribers AS s (group_name, subscriber_id, node_id,"
                    " subscription_requests, registered_at, last_seen)"
                    " VALUES ('g', 's1', 'n1', '[]', now(), now())"
                    " ON CONFLICT (group_name, subscriber_id) DO UPDATE SET last_seen = now()"
                )
            )
            apply = asyncio.create_task(backend.subscriptions.apply([takeover()]))
            await blocked_by(probe, holder_pid)
            assert not apply.done()
            await holder.execute("COMMIT")
            await asyncio.wait_for(apply, timeout=20)
        assert await backend.subscriptions.list() == [
            SourceHolding(
                group="g",
                source=X,
                subscriber_id="s1",
                node_id="n1",
                epoch=1,
                state=HoldingState.REVOKING,
            )
        ]


async def test_the_coordinator_revokes_from_a_holder_that_heartbeated_after_the_listing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with fresh_postgres_backend(max_size=3) as backend:
        await set_up(backend, purged=False)
        listed = backend.subscriptions.list

        async def list_then_heartbeat(**kwargs: Any) -> list[SourceHolding]:
            holdings = await listed(**kwargs)
            await backend.subscribers.heartbeat_all("n1", [("g", "s1", [X])])
            return holdings

        monkeypatch.setattr(backend.subscriptions, "list", list_then_heartbeat)
        coordinator = EventSubscriptionCoordinator(backend)
        lock = await backend.locks.try_lock(coordinator.lock_name)
        assert lock is not None
        coordinator._take(lock)  # lead without running the loop
        try:
            await coordinator.coordinate()
        finally:
            await coordinator._give_up()
        (change,) = coordinator.last_allocation[0].changes
        assert change == takeover(age=timedelta(seconds=5))  # its max age
        monkeypatch.undo()
        assert await backend.subscriptions.list() == [
            SourceHolding(
                group="g",
                source=X,
                subscriber_id="s1",
                node_id="n1",
                epoch=1,
                state=HoldingState.REVOKING,
            )
        ]
        checkpoint = await backend.checkpoints.get("g", X)
        assert checkpoint is not None and checkpoint.epoch == 2  # fenced: s1 must hand over

"""The distributed broker across node processes on PostgreSQL (NodeSet): scenarios
with exact counts, a two-holders checker, leader loss and a frozen node."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest

from eventmill import NewEvent
from eventmill.backends.base import HoldingState
from eventmill.backends.postgres import PostgresBackend
from eventmill.backends.postgres.locks import lock_key
from eventmill.broker.coordinator import COORDINATOR_LOCK
from eventmill.broker.distributed import DistributedEventBrokerSettings
from eventmill.store import EventStore
from tests.harness.node_process import GroupConfig
from tests.harness.nodes import Node, NodeSet
from tests.postgres_support import fresh_postgres_backend

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

FAST = DistributedEventBrokerSettings(
    subscriber_manager_heartbeat_interval=timedelta(milliseconds=500),
    subscriber_manager_purge_interval=timedelta(seconds=3),
    subscriber_manager_subscriber_max_age=timedelta(seconds=3),
    coordinator_distribution_interval=timedelta(milliseconds=100),
    coordinator_leadership_max_duration=timedelta(minutes=5),
    observer_synchronisation_interval=timedelta(milliseconds=100),
)
CATEGORIES = [f"c{n}" for n in range(5)]
PARTITIONS = 4
CHECKPOINT_EVERY = 10
POLL_INTERVAL = timedelta(seconds=2)  # publish notifications wake subscribers sooner
NODE_POOL_SIZE = 4


def transactional_groups(count: int) -> list[GroupConfig]:
    return [
        GroupConfig(
            group=f"g{n:02}", category=CATEGORIES[n % len(CATEGORIES)], partitions=PARTITIONS
        )
        for n in range(count)
    ]


AT_LEAST_ONCE = GroupConfig(group="alo", category="c0", partitions=PARTITIONS, transactional=False)


async def wait_until(
    check: Callable[[], Any], within: float = 60.0, what: str = "condition"
) -> None:
    """Await ``check()`` (a coroutine function) until it returns true; fail after
    ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"{what} not reached in {within}s"
        await asyncio.sleep(0.05)


class Publisher:
    """Publishes small batches to random streams of the categories until stopped;
    remembers how many events each category got."""

    def __init__(self, backend: PostgresBackend) -> None:
        self.store = EventStore(backend)
        self.counts: Counter[str] = Counter()
        self.random = random.Random(7)

    async def publish_some(self, batches: int) -> None:
        for _ in range(batches):
            category = self.random.choice(CATEGORIES)
            stream = f"s{self.random.randrange(40)}"
            events = [NewEvent(name="tick", payload={"n": n}) for n in range(3)]
            await self.store.stream(category=category, stream=stream).publish(events)
            self.counts[category] += len(events)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Publish a batch about every 0.2 s in the block; on leaving, finish the batch
        being published (so ``counts`` is exact) and stop."""
        stop = asyncio.Event()

        async def loop() -> None:
            while not stop.is_set():
                await self.publish_some(1)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await stop.wait()

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            stop.set()
            await task


async def rows(backend: PostgresBackend, query: str, *args: Any) -> list[tuple[Any, ...]]:
    async with backend.connection() as connection:
        cursor = await connection.execute(backend.sql(query), args)
        return await cursor.fetchall()


async def caught_up(
    backend: PostgresBackend, publisher: Publisher, groups: Sequence[GroupConfig]
) -> bool:
    """Whether every group processed every event of its category (distinct ids)."""
    found = dict(
        await rows(
            backend,
            "SELECT group_name, count(DISTINCT event_id) FROM {schema}.processed GROUP BY 1",
        )
    )
    return all(found.get(g.group, 0) == publisher.counts[g.category] for g in groups)


async def overlaps(backend: PostgresBackend) -> int:
    """How many (group, source) epoch pairs were processed at overlapping times, or by
    more than one subscriber in one epoch: a newer epoch's first event processed before
    an older epoch's last one means two holders at once. Must be 0."""
    [(crossed,)] = await rows(
        backend,
        "WITH spans AS (SELECT group_name, source_key, epoch, min(at) AS lo, max(at) AS hi,"
        " count(DISTINCT subscriber_id) AS holders FROM {schema}.processed GROUP BY 1, 2, 3)"
        " SELECT (SELECT count(*) FROM spans a JOIN spans b USING (group_name, source_key)"
        "  WHERE a.epoch < b.epoch AND a.hi >= b.lo)"
        " + (SELECT count(*) FROM spans WHERE holders > 1)",
    )
    return int(crossed)


async def duplicates(backend: PostgresBackend, group: str) -> int:
    [(count,)] = await rows(
        backend,
        "SELECT count(*) - count(DISTINCT event_id) FROM {schema}.processed WHERE group_name = %s",
        group,
    )
    return int(count)


async def holders_per_group(backend: PostgresBackend) -> dict[str, Counter[str]]:
    held: dict[str, Counter[str]] = {}
    for holding in await backend.subscriptions.list():
        if holding.state is HoldingState.ASSIGNED and holding.node_id is not None:
            held.setdefault(holding.group, Counter())[holding.node_id] += 1
    return held


def balanced_over(nodes: Sequence[Node]) -> Callable[[PostgresBackend], Any]:
    async def check(backend: PostgresBackend) -> bool:
        wanted = {node.node_id for node in nodes}
        per_group = await holders_per_group(backend)
        return all(
            set(counter) == wanted
            and sum(counter.values()) == PARTITIONS
            and max(counter.values()) - min(counter.values()) <= 1
            for counter in per_group.values()
        )

    return check


async def held_by(backend: PostgresBackend, node: Node, group: str) -> int:
    """How many sources of ``group`` ``node`` holds now."""
    return sum(
        1
        for holding in await backend.subscriptions.list(group=group)
        if holding.node_id == node.node_id
    )


async def test_three_nodes_fifty_groups_every_event_once_through_replacements_and_a_kill() -> None:
    """One node, three nodes, replace one, replace all, kill one: publishing throughout;
    transactional groups process every event exactly once, the at-least-once group
    repeats only what the killed node had not checkpointed (< CHECKPOINT_EVERY per
    source it held), and no source ever had two holders at once."""
    groups = [*transactional_groups(50), AT_LEAST_ONCE]
    phases: list[tuple[str, float]] = []
    began = time.monotonic()

    def phase(name: str) -> None:
        phases.append((name, round(time.monotonic() - began, 1)))

    async with (
        fresh_postgres_backend(max_size=3) as backend,
        NodeSet(
            backend,
            groups=groups,
            settings=FAST,
            checkpoint_every=CHECKPOINT_EVERY,
            poll_interval=POLL_INTERVAL,
            pool_size=NODE_POOL_SIZE,
        ) as nodes,
    ):
        publisher = Publisher(backend)
        await publisher.publish_some(20)
        first = await nodes.start()
        async with publisher.running():
            await wait_until(lambda: caught_up(backend, publisher, groups), what="one node")
            phase("one node")
            second, third = await nodes.start(), await nodes.start()
            await wait_until(lambda: balanced_over([first, second, third])(backend))
            phase("three nodes")
            first = await nodes.replace(first)
            await wait_until(lambda: balanced_over([first, second, third])(backend))
            phase("replace one")
            replaced = [await nodes.start() for _ in range(3)]
            for old in (first, second, third):
                assert await nodes.stop(old) == 0
            await wait_until(lambda: balanced_over(replaced)(backend))
            phase("replace all")
            killed = replaced.pop()
            held_when_killed = await held_by(backend, killed, AT_LEAST_ONCE.group)
            await nodes.kill(killed)
            await wait_until(lambda: balanced_over(replaced)(backend), what="after the kill")
            phase("kill one")
        await wait_until(lambda: caught_up(backend, publisher, groups), what="final catch-up")
        phase("caught up")
        for node in replaced:
            assert await nodes.stop(node) == 0
        phase("stopped")
        print("phases (name, seconds since start):", phases)
        exact = await rows(
            backend,
            "SELECT group_name, count(*) FROM {schema}.processed WHERE group_name <> %s GROUP BY 1",
            AT_LEAST_ONCE.group,
        )
        assert dict(exact) == {g.group: publisher.counts[g.category] for g in groups[:-1]}
        repeated = await duplicates(backend, AT_LEAST_ONCE.group)
        assert 0 <= repeated <= (CHECKPOINT_EVERY - 1) * held_when_killed
        assert await overlaps(backend) == 0


async def leaders(backend: PostgresBackend) -> set[str]:
    """The nodes whose latest node_log row says they lead."""
    latest = await rows(
        backend,
        "SELECT DISTINCT ON (node_id) node_id, is_leader FROM {schema}.node_log"
        " ORDER BY node_id, at DESC",
    )
    return {node_id for node_id, leading in latest if leading}


async def test_terminating_the_leaders_lock_connection_moves_coordination() -> None:
    groups = transactional_groups(5)
    async with (
        fresh_postgres_backend(max_size=3) as backend,
        NodeSet(backend, groups=groups, settings=FAST) as nodes,
    ):
        started = [await nodes.start() for _ in range(3)]

        async def one_leader() -> bool:
            return len(await leaders(backend)) == 1

        await wait_until(one_leader)
        [old] = await leaders(backend)
        key = lock_key(backend.schema, COORDINATOR_LOCK)
        [(terminated,)] = await rows(
            backend,
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
            " AND classid = %s::bigint::oid AND objid = %s::bigint::oid AND objsubid = 1"
            " AND granted",
            (key >> 32) & 0xFFFFFFFF,
            key & 0xFFFFFFFF,
        )
        assert terminated is True

        async def moved() -> bool:
            now = await leaders(backend)
            return len(now) == 1 and old not in now

        await wait_until(moved, what="a new leader")
        publisher = Publisher(backend)
        await publisher.publish_some(10)
        await wait_until(lambda: caught_up(backend, publisher, groups))
        await wait_until(lambda: balanced_over(started)(backend))
        assert await overlaps(backend) == 0


async def test_a_frozen_node_never_processes_a_source_moved_away_while_it_slept() -> None:
    groups = transactional_groups(10)
    async with (
        fresh_postgres_backend(max_size=3) as backend,
        NodeSet(backend, groups=groups, settings=FAST) as nodes,
    ):
        started = [await nodes.start() for _ in range(3)]
        publisher = Publisher(backend)
        await wait_until(lambda: balanced_over(started)(backend))
        await wait_until(lambda: leaders(backend))
        leader = next(iter(await leaders(backend)))
        frozen = next(node for node in started if node.node_id != leader)
        before = {
            (h.group, h.source): h.epoch
            for h in await backend.subscriptions.list(node_id=frozen.node_id)
        }
        assert before
        async with publisher.running():
            nodes.freeze(frozen)
            try:

                async def moved_away() -> bool:
                    now = await backend.subscriptions.list()
                    return all(
                        h.node_id != frozen.node_id and h.epoch > before[(h.group, h.source)]
                        for h in now
                        if (h.group, h.source) in before
                    )

                await wait_until(moved_away, what="its sources moved")
                await publisher.publish_some(10)  # events of moved sources while it sleeps
            finally:
                nodes.thaw(frozen)
            await publisher.publish_some(10)
        await wait_until(lambda: caught_up(backend, publisher, groups))
        # processed under a stale epoch after the move: two holders at once
        assert await overlaps(backend) == 0
        [(stale,)] = await rows(
            backend,
            "SELECT count(*) FROM {schema}.processed p JOIN {schema}.subscriptions s"
            " ON s.group_name = p.group_name AND s.source_key = p.source_key"
            " WHERE p.node_id = %s AND p.epoch < s.epoch AND p.at > ("
            "  SELECT min(q.at) FROM {schema}.processed q WHERE q.group_name = p.group_name"
            "  AND q.source_key = p.source_key AND q.epoch > p.epoch)",
            frozen.node_id,
        )
        assert stale == 0
        for checkpoint in await backend.checkpoints.list():
            if (checkpoint.group, checkpoint.source) in before:
                assert checkpoint.epoch > before[(checkpoint.group, checkpoint.source)]
        for group in groups:
            assert await duplicates(backend, group.group) == 0


async def test_a_frozen_leader_loses_the_lock_to_another_node_and_does_not_lead_on_waking() -> None:
    """The coordinator lock is leased for the subscriber max age: while the leader is
    frozen the server ends its idle lock session, another node takes over within the
    budget (max age + a distribution interval; the deadline allows twice that), and the
    woken ex-leader never leads again."""
    groups = transactional_groups(5)
    budget = (
        FAST.subscriber_manager_subscriber_max_age + FAST.coordinator_distribution_interval
    ).total_seconds()
    async with (
        fresh_postgres_backend(max_size=3) as backend,
        NodeSet(backend, groups=groups, settings=FAST) as nodes,
    ):
        started = [await nodes.start() for _ in range(3)]
        live = {node.node_id for node in started}

        async def live_leaders() -> set[str]:
            return live & await leaders(backend)

        await wait_until(live_leaders)
        [old] = await live_leaders()
        frozen = next(node for node in started if node.node_id == old)
        publisher = Publisher(backend)
        async with publisher.running():
            nodes.freeze(frozen)
            try:

                async def taken_over() -> bool:
                    return bool(await live_leaders() - {old})

                await wait_until(taken_over, within=2 * budget, what="a new leader")
                awake = [node for node in started if node is not frozen]
                await wait_until(
                    lambda: balanced_over(awake)(backend), what="the frozen node's sources moved"
                )
            finally:
                [(thawed_at,)] = await rows(backend, "SELECT clock_timestamp()")
                nodes.thaw(frozen)

            async def stepped_down() -> bool:
                return old not in await leaders(backend)

            await wait_until(stepped_down, what="the woken ex-leader stepping down")
            await wait_until(lambda: balanced_over(started)(backend), what="rebalanced")
        await wait_until(lambda: caught_up(backend, publisher, groups))
        [(led_after_waking,)] = await rows(
            backend,
            "SELECT count(*) FROM {schema}.node_log WHERE node_id = %s AND is_leader AND at > %s",
            old,
            thawed_at,
        )
        assert led_after_waking == 0
        assert len(await live_leaders()) == 1
        assert await overlaps(backend) == 0
        for group in groups:
            assert await duplicates(backend, group.group) == 0

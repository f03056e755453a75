"""DistributedEventBroker in memory: several brokers (nodes) sharing one backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta

import pytest

from eventmill.backends.base import Assign, HoldingState, SourceHolding, SubscriptionStateStore
from eventmill.backends.memory import (
    InMemoryBackend,
    InMemoryNodeStateStore,
    InMemorySubscriberStateStore,
    InMemorySubscriptionStateStore,
)
from eventmill.broker.distributed import (
    DistributedEventBroker,
    DistributedEventBrokerSettings,
    make_event_broker,
)
from eventmill.broker.loop import BrokerLoop
from eventmill.broker.observer import EventSubscriptionObserver
from eventmill.broker.singleton import SingletonEventBroker
from eventmill.broker.subscriber_manager import EventSubscriberManager
from eventmill.errors import InvalidInputError, InvalidSettingsError, StorageError
from eventmill.events import EventSourceIdentifier, StreamIdentifier
from eventmill.services.status import ProcessStatus
from tests.unit.broker.test_singleton import FakeSubscriber

FAST = DistributedEventBrokerSettings(
    subscriber_manager_heartbeat_interval=timedelta(milliseconds=30),
    subscriber_manager_purge_interval=timedelta(milliseconds=200),
    subscriber_manager_subscriber_max_age=timedelta(milliseconds=200),
    coordinator_distribution_interval=timedelta(milliseconds=20),
    coordinator_leadership_max_duration=timedelta(minutes=1),
    observer_synchronisation_interval=timedelta(milliseconds=20),
)
SOURCES = tuple(StreamIdentifier("orders", f"order-{n}") for n in range(10))


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``predicate`` until true; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@asynccontextmanager
async def running(broker: DistributedEventBroker) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(broker.execute())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def held_counts(subscribers: Sequence[FakeSubscriber]) -> list[int]:
    return sorted(len(s.held) for s in subscribers)


async def test_two_nodes_share_sources_and_hand_over_on_unregister() -> None:
    backend = InMemoryBackend()
    owners: dict[EventSourceIdentifier, str] = {}
    a = FakeSubscriber("a", owners, SOURCES)
    b = FakeSubscriber("b", owners, SOURCES)
    node_a = DistributedEventBroker(backend, node_id="node-a", settings=FAST)
    node_b = DistributedEventBroker(backend, node_id="node-b", settings=FAST)
    async with running(node_a), running(node_b):
        await node_a.register(a)
        await node_b.register(b)
        await wait_until(lambda: held_counts([a, b]) == [5, 5])
        assert [node_a.is_leader, node_b.is_leader].count(True) == 1
        holdings = await backend.subscriptions.list()
        assert {(h.subscriber_id, h.source) for h in holdings} == {
            (s.id, source) for s in (a, b) for source in s.held
        }
        await node_b.unregister(b)
        assert b.held == {}
        await wait_until(lambda: len(a.held) == 10)
    for source, epoch in a.held.items():
        checkpoint = await backend.checkpoints.get("g", source)
        assert checkpoint is not None
        assert checkpoint.epoch == epoch


async def test_a_joining_subscriber_gets_its_share_by_revoke_then_assign() -> None:
    backend = InMemoryBackend()
    owners: dict[EventSourceIdentifier, str] = {}
    subscribers = [FakeSubscriber(f"s{n}", owners, SOURCES) for n in range(3)]
    nodes = [DistributedEventBroker(backend, node_id=f"n{n}", settings=FAST) for n in range(3)]
    async with running(nodes[0]), running(nodes[1]), running(nodes[2]):
        await nodes[0].register(subscribers[0])
        await nodes[1].register(subscribers[1])
        await wait_until(lambda: held_counts(subscribers[:2]) == [5, 5])
        before = {source: s.id for s in subscribers for source in s.held}
        await nodes[2].register(subscribers[2])
        await wait_until(lambda: held_counts(subscribers) == [3, 3, 4])
        after = {source: s.id for s in subscribers for source in s.held}
        moved = [source for source in SOURCES if before[source] != after[source]]
        assert len(moved) == 3
        assert all(after[source] == "s2" for source in moved)
    # FakeSubscriber.accept asserts that nobody else held the source at that moment.
    assert sum(entry[0] == "accept" for s in subscribers for entry in s.log) == 13


async def test_a_dead_node_loses_its_sources_under_a_new_fenced_epoch() -> None:
    backend = InMemoryBackend()
    a = FakeSubscriber("a", {}, SOURCES)
    b = FakeSubscriber("b", {}, SOURCES)  # separate owners: a's node dies holding
    node_a = DistributedEventBroker(backend, node_id="node-a", settings=FAST)
    node_b = DistributedEventBroker(backend, node_id="node-b", settings=FAST, coordinate=False)
    async with running(node_b):
        async with running(node_a):
            await node_a.register(a)
            await node_b.register(b)
            await wait_until(lambda: held_counts([a, b]) == [5, 5])
            assert node_a.is_leader
        # node_a stopped without unregistering: no heartbeats, no coordinator.
        lost = dict(a.held)
        node_c = DistributedEventBroker(backend, node_id="node-c", settings=FAST, observe=False)
        async with running(node_c):
            await wait_until(lambda: len(b.held) == 10)
            assert node_c.is_leader
    for source, old_epoch in lost.items():
        assert b.held[source] > old_epoch
        checkpoint = await backend.checkpoints.get("g", source)
        assert checkpoint is not None
        assert checkpoint.epoch == b.held[source]


async def test_leadership_moves_when_the_lock_is_lost_or_its_term_ends() -> None:
    backend = InMemoryBackend()
    short = DistributedEventBrokerSettings(
        subscriber_manager_heartbeat_interval=FAST.subscriber_manager_heartbeat_interval,
        subscriber_manager_subscriber_max_age=FAST.subscriber_manager_subscriber_max_age,
        coordinator_distribution_interval=timedelta(milliseconds=20),
        coordinator_leadership_max_duration=timedelta(milliseconds=150),
    )
    first = DistributedEventBroker(backend, node_id="first", settings=FAST, observe=False)
    async with running(first):
        await wait_until(lambda: first.is_leader)
        second = DistributedEventBroker(backend, node_id="second", settings=short, observe=False)
        async with running(second):
            backend.locks.break_lock("eventmill-coordinator")
            await wait_until(lambda: not first.is_leader)
            await wait_until(lambda: first.is_leader or second.is_leader)
            assert first.coordinator is not None
            assert second.coordinator is not None
            terms = first.coordinator, second.coordinator
            await wait_until(lambda: terms[1].terms >= 1)
            # second's terms end after 150 ms, so first leads again at some point
            await wait_until(lambda: terms[0].terms >= 2)
            assert not (first.is_leader and second.is_leader)


class FlakySubscriptions(InMemorySubscriptionStateStore):
    """Fails ``list`` while ``failing`` is set, counting the failures."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False
        self.failures = 0

    async def list(
        self, *, group: str | None = None, node_id: str | None = None
    ) -> list[SourceHolding]:
        if self.failing:
            self.failures += 1
            raise StorageError("database down")
        return await super().list(group=group, node_id=node_id)


class FlakyBackend(InMemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.flaky = FlakySubscriptions()

    @property
    def subscriptions(self) -> SubscriptionStateStore:  # type: ignore[override]
        return self.flaky


async def test_storage_failures_report_errored_back_off_and_recover() -> None:
    backend = FlakyBackend()
    a = FakeSubscriber("a", {}, SOURCES)
    node = DistributedEventBroker(backend, node_id="node", settings=FAST)
    async with running(node) as task:
        await node.register(a)
        await node.wait_ready()
        await wait_until(lambda: len(a.held) == 10)
        backend.flaky.failing = True
        await wait_until(lambda: node.status is ProcessStatus.ERRORED)
        await wait_until(lambda: backend.flaky.failures >= 4)
        assert node.observer is not None
        assert isinstance(node.observer.last_error, StorageError)
        backend.flaky.failing = False
        await wait_until(lambda: node.status is not ProcessStatus.ERRORED, within=15)
        assert not task.done()
        assert len(a.held) == 10


class FlakySubscribers(InMemorySubscriberStateStore):
    """Fails heartbeats while ``failing`` is set."""

    failing = False

    async def heartbeat_all(
        self,
        node_id: str,
        entries: Sequence[tuple[str, str, Sequence[EventSourceIdentifier]]],
    ) -> None:
        if self.failing:
            raise StorageError("database down (subscriber heartbeat)")
        await super().heartbeat_all(node_id, entries)


class FlakyNodes(InMemoryNodeStateStore):
    """Fails node heartbeats while ``failing`` is set."""

    failing = False

    async def heartbeat(self, node_id: str, mode: str, *, leader_term: int | None) -> None:
        if self.failing:
            raise StorageError("database down (node heartbeat)")
        await super().heartbeat(node_id, mode, leader_term=leader_term)


class FlakyHeartbeatBackend(InMemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.flaky_subscribers = FlakySubscribers()
        self.flaky_nodes = FlakyNodes()

    @property
    def subscribers(self) -> InMemorySubscriberStateStore:
        return self.flaky_subscribers

    @property
    def nodes(self) -> InMemoryNodeStateStore:
        return self.flaky_nodes

    def fail(self, failing: bool) -> None:
        self.flaky_subscribers.failing = self.flaky_nodes.failing = failing


async def test_the_first_round_after_an_outage_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    """A failed round raises one of its heartbeats' errors; the others must not fail the
    rounds after the database is back (one stale error a round, each followed by a
    longer backoff). Outages of 3, 4 and 5 failed rounds, so that each phase of the
    subscriber and node heartbeats is met."""
    backend = FlakyHeartbeatBackend()
    manager = EventSubscriberManager(backend, "node", heartbeat_interval=timedelta(milliseconds=10))
    task = asyncio.create_task(manager.execute())
    try:
        for failed_rounds in (3, 4, 5):
            await wait_until(lambda: manager.status is ProcessStatus.WAITING)
            with caplog.at_level(logging.DEBUG, logger="eventmill.broker.loop"):
                caplog.clear()
                backend.fail(True)
                await wait_until(lambda: f"({failed_rounds} in a row)" in caplog.text)  # noqa: B023
                backend.fail(False)
                caplog.clear()
                rounds = manager.rounds
                await wait_until(lambda: manager.rounds > rounds)  # noqa: B023
            assert "round failed" not in caplog.text, failed_rounds
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_register_refuses_duplicates_and_coordinator_only_nodes() -> None:
    backend = InMemoryBackend()
    node = DistributedEventBroker(backend, node_id="n", settings=FAST)
    await node.register(FakeSubscriber("a", {}, SOURCES))
    with pytest.raises(InvalidInputError):
        await node.register(FakeSubscriber("a", {}, SOURCES))
    coordinator_only = DistributedEventBroker(backend, node_id="c", observe=False)
    with pytest.raises(InvalidInputError):
        await coordinator_only.register(FakeSubscriber("b", {}, SOURCES))
    assert [r.id for r in await backend.subscribers.list()] == ["a"]


@pytest.mark.parametrize(
    "changes",
    [
        {"subscriber_manager_heartbeat_interval": timedelta(0)},
        {"coordinator_distribution_interval": 0.5},
        {"subscriber_manager_subscriber_max_age": timedelta(seconds=1)},
        {"observer_synchronisation_interval": timedelta(seconds=-1)},
    ],
)
def test_settings_are_checked(changes: dict[str, object]) -> None:
    with pytest.raises(InvalidSettingsError):
        DistributedEventBrokerSettings(**changes)  # type: ignore[arg-type]


def test_make_event_broker_builds_either_kind() -> None:
    backend = InMemoryBackend()
    assert isinstance(make_event_broker(backend, distributed=False), SingletonEventBroker)
    built = make_event_broker(backend, distributed=True, node_id="x", settings=FAST)
    assert isinstance(built, DistributedEventBroker)
    assert built.settings is FAST
    with pytest.raises(InvalidSettingsError):
        make_event_broker(backend, distributed=False, settings=FAST)
    with pytest.raises(InvalidSettingsError):
        DistributedEventBroker(backend, coordinate=False, observe=False)


async def test_holdings_end_assigned_to_the_live_holders_only() -> None:
    backend = InMemoryBackend()
    owners: dict[EventSourceIdentifier, str] = {}
    a = FakeSubscriber("a", owners, SOURCES)
    node = DistributedEventBroker(backend, node_id="n", settings=FAST)
    async with running(node):
        await node.register(a)
        await wait_until(lambda: len(a.held) == 10)
        await node.unregister(a)
        await wait_until(lambda: not owners)
    holdings = await backend.subscriptions.list()
    assert all(h.state is HoldingState.RELEASED for h in holdings)


async def test_a_loop_honours_a_cancellation_swallowed_inside_a_round() -> None:
    class Swallowing(BrokerLoop):
        def __init__(self) -> None:
            super().__init__(timedelta(hours=1), what="interval")
            self.entered = asyncio.Event()

        async def run_round(self) -> timedelta | None:
            self.entered.set()
            with contextlib.suppress(asyncio.CancelledError):  # as 3.11's wait_for may
                await asyncio.Event().wait()
            return None

    loop = Swallowing()
    task = asyncio.create_task(loop.execute())
    await loop.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(10):
            await task
    assert loop.status is ProcessStatus.STOPPED


async def test_a_new_subscriber_is_synchronised_every_quarter_interval_until_it_holds() -> None:
    backend = InMemoryBackend()
    observer = EventSubscriptionObserver(
        backend, "n", synchronisation_interval=timedelta(milliseconds=400)
    )
    subscriber = FakeSubscriber("s", {})
    observer.add(subscriber)
    assert await observer.run_round() == timedelta(milliseconds=100)  # nothing held yet
    await backend.subscriptions.apply(
        [Assign(group="g", source=SOURCES[0], subscriber_id="s", node_id="n", epoch=1)]
    )
    assert await observer.run_round() is None  # it holds a source: the full interval
    assert subscriber.held == {SOURCES[0]: 1}


async def test_a_source_its_subscriber_dropped_is_released_and_accepted_again_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A subscriber that dropped a source (its checkpoint fenced at a newer epoch by an
    assignment never applied) is not given it again at the old epoch: the observer
    releases it, retrying after a failed release, and accepts it under a newer epoch."""
    backend = InMemoryBackend()
    observer = EventSubscriptionObserver(backend, "n")
    subscriber = FakeSubscriber("s", {})
    observer.add(subscriber)
    source = SOURCES[0]
    assign = Assign(group="g", source=source, subscriber_id="s", node_id="n", epoch=1)
    await backend.subscriptions.apply([assign])
    await observer.run_round()
    subscriber.drop(source)
    apply = backend.subscriptions.apply

    async def failing_apply(changes: Sequence[object]) -> None:
        monkeypatch.setattr(backend.subscriptions, "apply", apply)
        raise StorageError("database down (release)")

    monkeypatch.setattr(backend.subscriptions, "apply", failing_apply)
    with pytest.raises(StorageError):
        await observer.run_round()
    await observer.run_round()  # the release is retried; X is not accepted at epoch 1
    (holding,) = await backend.subscriptions.list()
    assert (holding.state, holding.subscriber_id, holding.epoch) == (HoldingState.RELEASED, None, 1)
    assert subscriber.held == {}
    await backend.subscriptions.apply([replace(assign, epoch=2)])
    await observer.run_round()
    assert subscriber.held == {source: 2}
    assert subscriber.log == [("accept", source, 1), ("drop", source, 1), ("accept", source, 2)]

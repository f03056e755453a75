"""EventProcessingNode on the in-memory backend: modes, registration and removal while
running, shutdown order, idempotent stop, refusal to re-enter, loud failures."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from datetime import timedelta

import pytest

from eventmill.backends.base import Checkpoint
from eventmill.backends.memory import (
    InMemoryBackend,
    InMemoryCheckpointStorage,
    InMemorySubscriberStateStore,
)
from eventmill.broker.distributed import DistributedEventBroker, DistributedEventBrokerSettings
from eventmill.broker.singleton import SingletonEventBroker
from eventmill.consumers import EventProcessor
from eventmill.consumers.failures import FailureAction, FailurePolicy
from eventmill.errors import (
    CatchUpTimeoutError,
    InvalidInputError,
    InvalidSettingsError,
    LifecycleError,
    ProcessorFailedError,
)
from eventmill.events import (
    CategoryIdentifier,
    EventSourceIdentifier,
    NewEvent,
    StoredEvent,
    StreamIdentifier,
)
from eventmill.node import EventProcessingNode, NodeMode, NodeSettings
from eventmill.services.error_handlers import ConstantBackoff
from eventmill.services.manager import IsolationMode
from eventmill.services.status import ProcessStatus
from eventmill.store import EventStore
from tests.unit.services.conditions import wait_until

FAST = DistributedEventBrokerSettings(
    subscriber_manager_heartbeat_interval=timedelta(milliseconds=50),
    subscriber_manager_purge_interval=timedelta(milliseconds=200),
    subscriber_manager_subscriber_max_age=timedelta(milliseconds=500),
    coordinator_distribution_interval=timedelta(milliseconds=20),
    observer_synchronisation_interval=timedelta(milliseconds=20),
)
DISTRIBUTED = NodeSettings(distributed=True, broker_settings=FAST)
STREAMS = [StreamIdentifier("orders", f"order-{n}") for n in range(6)]


class Counting(EventProcessor):
    """Counts each event it processes (by id) and the threads it ran on."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self.threads: set[int] = set()

    async def process_event(self, event: StoredEvent) -> None:
        self.seen[event.id] += 1
        self.threads.add(threading.get_ident())


async def publish(backend: InMemoryBackend, count: int, *, start: int = 0) -> list[str]:
    store = EventStore(backend)
    ids: list[str] = []
    for number in range(start, start + count):
        source = STREAMS[number % len(STREAMS)]
        stored = await store.stream(category=source.category, stream=source.stream).publish(
            [NewEvent(name="order-placed", payload={"n": number})]
        )
        ids.extend(event.id for event in stored)
    return ids


async def test_both_mode_processes_everything_once_and_reports_statistics() -> None:
    backend = InMemoryBackend()
    ids = await publish(backend, 60)
    counting = Counting()
    node = EventProcessingNode(backend, node_id="n1")
    assert isinstance(node.broker, SingletonEventBroker)
    node.register_subscriber(group="totals", source=STREAMS, processor=counting)
    assert node.status is ProcessStatus.INITIALISED
    async with node:
        assert node.status in (ProcessStatus.WAITING, ProcessStatus.RUNNING)
        await node.wait_caught_up(timeout=timedelta(seconds=10))
        assert counting.seen == Counter(dict.fromkeys(ids, 1))
        more = await publish(backend, 12, start=60)
        await node.wait_caught_up(timeout=10)
        assert counting.seen == Counter(dict.fromkeys(ids + more, 1))
        (stats,) = await node.statistics()
        assert (stats.group, stats.id) == ("totals", "totals@n1")
        assert {s.source for s in stats.sources} == set(STREAMS)
        assert {s.epoch for s in stats.sources} == {1}
        assert stats.lag == 0
        assert all(s.processed == s.latest == 11 for s in stats.sources)
        assert set(node.health()) == {"broker", "subscriber totals/totals@n1"}
    assert node.status is ProcessStatus.STOPPED


async def test_statistics_report_lag_in_events() -> None:
    backend = InMemoryBackend()
    await publish(backend, 30)
    gate = asyncio.Event()

    async def blocked(event: StoredEvent) -> None:
        await gate.wait()

    node = EventProcessingNode(backend, node_id="n1")
    node.register_subscriber(group="slow", source=CategoryIdentifier("orders"), processor=blocked)
    async with node:
        (stats,) = await node.statistics()
        assert stats.lag == 30
        gate.set()
        await node.wait_caught_up(timeout=10)
        (stats,) = await node.statistics()
        assert stats.lag == 0


async def test_registering_and_removing_while_running() -> None:
    backend = InMemoryBackend()
    first, second, late = Counting(), Counting(), Counting()
    node = EventProcessingNode(backend, node_id="n1")
    one = node.register_subscriber(group="g", source=STREAMS, processor=first)
    async with node:
        two = node.register_subscriber(group="g", source=STREAMS, processor=second)
        other = node.register_subscriber(
            group="h", source=CategoryIdentifier("orders"), processor=late
        )
        await node.wait_ready()
        assert (one.id, two.id) == ("g@n1", "g@n1#2")
        assert len(one.subscriber.sources) == len(two.subscriber.sources) == 3
        ids = await publish(backend, 30)
        await node.wait_caught_up(timeout=10)
        assert first.seen + second.seen == Counter(dict.fromkeys(ids, 1))
        assert late.seen == Counter(dict.fromkeys(ids, 1))

        await one.remove()
        await one.remove()  # harmless twice
        assert one.subscriber.sources == {}
        await node.wait_ready()
        assert set(two.subscriber.sources) == set(STREAMS)
        more = await publish(backend, 30, start=30)
        await node.wait_caught_up(timeout=10)
        assert first.seen + second.seen == Counter(dict.fromkeys(ids + more, 1))
        assert not set(more) & set(first.seen)
        assert [h.id for h in node.subscribers] == ["g@n1#2", "h@n1"]
        await other.remove()
    assert late.seen == Counter(dict.fromkeys(ids + more, 1))


async def test_dedicated_thread_subscriber_runs_off_the_main_thread() -> None:
    backend = InMemoryBackend()
    ids = await publish(backend, 24)
    counting = Counting()
    node = EventProcessingNode(backend, node_id="n1")
    handle = node.register_subscriber(
        group="g",
        source=STREAMS,
        processor=counting,
        isolation_mode=IsolationMode.DEDICATED_THREAD,
    )
    async with node:
        await node.wait_caught_up(timeout=10)
        more = await publish(backend, 6, start=24)
        await node.wait_caught_up(timeout=10)
        await handle.remove()
    assert counting.seen == Counter(dict.fromkeys(ids + more, 1))
    assert threading.get_ident() not in counting.threads


async def test_coordinator_node_refuses_subscribers() -> None:
    node = EventProcessingNode(InMemoryBackend(), mode=NodeMode.COORDINATOR)
    with pytest.raises(InvalidSettingsError, match="COORDINATOR"):
        node.register_subscriber(group="g", source=STREAMS, processor=Counting())


async def test_coordinator_and_observer_nodes_share_the_work() -> None:
    backend = InMemoryBackend()
    coordinator = EventProcessingNode(backend, mode=NodeMode.COORDINATOR, settings=DISTRIBUTED)
    observers = [
        EventProcessingNode(backend, mode=NodeMode.OBSERVER, node_id=f"o{n}", settings=DISTRIBUTED)
        for n in range(2)
    ]
    assert isinstance(coordinator.broker, DistributedEventBroker)
    countings = [Counting(), Counting()]
    for node, counting in zip(observers, countings, strict=True):
        node.register_subscriber(group="g", source=STREAMS, processor=counting)
    ids = await publish(backend, 60)
    async with coordinator, observers[0], observers[1]:
        await wait_until(
            lambda: all(len(h.subscriber.sources) == 3 for n in observers for h in n.subscribers)
        )
        for node in observers:
            await node.wait_caught_up(timeout=10)
    assert countings[0].seen + countings[1].seen == Counter(dict.fromkeys(ids, 1))
    assert countings[0].seen and countings[1].seen


async def test_both_mode_with_the_distributed_broker_in_memory() -> None:
    backend = InMemoryBackend()
    ids = await publish(backend, 30)
    counting = Counting()
    node = EventProcessingNode(backend, node_id="n1", settings=DISTRIBUTED)
    node.register_subscriber(group="g", source=STREAMS, processor=counting)
    async with node:
        await wait_until(lambda: len(node.subscribers[0].subscriber.sources) == len(STREAMS))
        await node.wait_caught_up(timeout=10)
    assert counting.seen == Counter(dict.fromkeys(ids, 1))


async def test_readiness_and_catching_up_do_not_wait_for_the_broker_intervals() -> None:
    """``wait_ready`` (a node's start, every ``wait_caught_up``) wakes the coordinator and
    the observer for their rounds: with rounds an hour apart, a node starts, and
    catches up twice, well inside the timeouts (it used to wait out each interval)."""
    hourly = DistributedEventBrokerSettings(
        subscriber_manager_heartbeat_interval=timedelta(milliseconds=50),
        subscriber_manager_subscriber_max_age=timedelta(seconds=30),
        coordinator_distribution_interval=timedelta(hours=1),
        observer_synchronisation_interval=timedelta(hours=1),
    )
    backend = InMemoryBackend()
    ids = await publish(backend, 12)
    counting = Counting()
    node = EventProcessingNode(
        backend, node_id="n1", settings=NodeSettings(distributed=True, broker_settings=hourly)
    )
    node.register_subscriber(group="g", source=STREAMS, processor=counting)
    async with asyncio.timeout(30), node:
        await node.wait_caught_up(timeout=10)
        ids += await publish(backend, 6, start=12)
        await node.wait_caught_up(timeout=10)
    assert counting.seen == Counter(dict.fromkeys(ids, 1))


class RecordingCheckpoints(InMemoryCheckpointStorage):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    async def save(
        self,
        group: str,
        source: EventSourceIdentifier,
        after: int | None,
        *,
        expected_version: int | None,
        epoch: int | None = None,
    ) -> Checkpoint:
        saved = await super().save(
            group, source, after, expected_version=expected_version, epoch=epoch
        )
        self.log.append(f"save {group} {after}")
        return saved


class RecordingSubscribers(InMemorySubscriberStateStore):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    async def remove(self, group: str, id: str) -> None:
        await super().remove(group, id)
        self.log.append(f"remove {group}")


class RecordingBackend(InMemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []
        self._checkpoints = RecordingCheckpoints(self.log)
        self._subscribers = RecordingSubscribers(self.log)


async def test_shutdown_saves_the_last_checkpoint_before_removing_the_subscriber() -> None:
    backend = RecordingBackend()
    await publish(backend, 20)
    reached, release = asyncio.Event(), asyncio.Event()

    async def slow(event: StoredEvent) -> None:
        if event.sequence_number == 5:
            reached.set()
            await release.wait()

    node = EventProcessingNode(
        backend,
        node_id="n1",
        settings=NodeSettings(distributed=True, broker_settings=FAST, checkpoint_interval=1000),
    )
    node.register_subscriber(group="g", source=CategoryIdentifier("orders"), processor=slow)
    async with node:
        await reached.wait()  # a batch is in flight
        node.stop()
        await wait_until(lambda: node.status is ProcessStatus.STOPPING)
        assert "remove g" not in backend.log
        release.set()
    saves = [entry for entry in backend.log if entry.startswith("save g")]
    # The in-flight batch ended at an event boundary and saved before the record went.
    assert saves and backend.log.index("remove g") > backend.log.index(saves[-1])
    stored = await backend.checkpoints.get("g", CategoryIdentifier("orders"))
    assert stored is not None and stored.after == 5  # the in-flight event, no further


async def test_stop_is_idempotent_and_a_node_runs_once() -> None:
    node = EventProcessingNode(InMemoryBackend())
    node.stop()  # before run: nothing
    node.register_subscriber(group="g", source=STREAMS, processor=Counting())
    async with node:
        node.stop()
        node.stop()
        await node.wait_stopped()
        assert node.status is ProcessStatus.STOPPED
    node.stop()
    with pytest.raises(LifecycleError):
        await node.run()
    with pytest.raises(LifecycleError):
        async with node:
            pass
    with pytest.raises(LifecycleError):
        node.register_subscriber(group="h", source=STREAMS, processor=Counting())
    with pytest.raises(LifecycleError):
        await node.wait_ready()


async def test_run_until_stop() -> None:
    backend = InMemoryBackend()
    ids = await publish(backend, 12)
    counting = Counting()
    node = EventProcessingNode(backend)
    node.register_subscriber(group="g", source=STREAMS, processor=counting)
    runner = asyncio.create_task(node.run())
    await node.wait_caught_up(timeout=10)
    node.stop()
    await runner
    assert counting.seen == Counter(dict.fromkeys(ids, 1))


class Broken(Exception):
    pass


async def test_a_failing_processor_stops_the_node_loudly_under_stop_node() -> None:
    backend = InMemoryBackend()
    await publish(backend, 6)

    async def failing(event: StoredEvent) -> None:
        raise Broken(event.id)

    stop_node = FailurePolicy(max_attempts=1, then=FailureAction.STOP_NODE)
    node = EventProcessingNode(backend, settings=NodeSettings(failure_policy=stop_node))
    node.register_subscriber(group="g", source=STREAMS, processor=failing)
    with pytest.raises(ProcessorFailedError) as raised:
        async with node:
            await node.wait_stopped()
    assert isinstance(raised.value.__cause__, Broken)
    assert "group g, source stream:orders/order-" in str(raised.value)
    assert node.status is ProcessStatus.ERRORED

    second = EventProcessingNode(backend)
    second.register_subscriber(
        group="g2", source=STREAMS, processor=failing, failure_policy=stop_node
    )
    with pytest.raises(ProcessorFailedError):
        await second.run()


async def test_by_default_a_failing_stream_is_parked_and_the_node_runs_on() -> None:
    backend = InMemoryBackend()
    ids = await publish(backend, 12)
    bad = {ids[0], ids[6]}  # both in stream order-0
    counting = Counting()

    async def failing(event: StoredEvent) -> None:
        if event.id in bad:
            raise Broken(event.id)
        await counting.process_event(event)

    quick = FailurePolicy(max_attempts=2, backoff=ConstantBackoff())
    healthy = Counting()
    node = EventProcessingNode(backend, settings=NodeSettings(poll_interval=timedelta(0.05)))
    node.register_subscriber(group="g", source=STREAMS, processor=failing, failure_policy=quick)
    node.register_subscriber(group="h", source=STREAMS, processor=healthy)
    async with node:
        await wait_until(lambda: len(counting.seen) == 10, within=10)
        await wait_until(lambda: node.status is ProcessStatus.DEGRADED, within=10)
        await node.wait_caught_up(timeout=10)
        assert healthy.seen == Counter(dict.fromkeys(ids, 1))
        [record] = await backend.parked.list()
        assert (record.group, record.stream, record.held) == ("g", STREAMS[0], 2)
        statistics = {s.group: s for s in await node.statistics()}
        assert (statistics["g"].parked, statistics["h"].parked) == (1, 0)
        assert node.health()[f"subscriber g/g@{node.node_id}"] is ProcessStatus.DEGRADED
    assert counting.seen == Counter({i: 1 for i in ids if i not in bad})


async def test_wait_caught_up_times_out() -> None:
    backend = InMemoryBackend()
    await publish(backend, 3)
    never = asyncio.Event()

    async def stuck(event: StoredEvent) -> None:
        await never.wait()

    node = EventProcessingNode(
        backend, settings=NodeSettings(shutdown_timeout=timedelta(seconds=1))
    )
    node.register_subscriber(group="g", source=STREAMS, processor=stuck)
    async with node:
        with pytest.raises(CatchUpTimeoutError):
            await node.wait_caught_up(timeout=0.05)
        never.set()


@pytest.mark.parametrize(
    "arguments",
    [
        {"poll_interval": 5},
        {"poll_interval": timedelta(seconds=-1)},
        {"checkpoint_interval": 0},
        {"checkpoint_interval": 1.5},
        {"error_handler": "retry"},
        {"isolation_mode": "main"},
        {"shutdown_timeout": timedelta(0)},
        {"page_size": 0},
        {"distributed": "yes"},
        {"broker_settings": {}},
    ],
)
def test_bad_settings_are_refused(arguments: dict[str, object]) -> None:
    with pytest.raises(InvalidSettingsError):
        NodeSettings(**arguments)  # type: ignore[arg-type]


async def test_bad_registrations_are_refused_and_register_nothing() -> None:
    node = EventProcessingNode(InMemoryBackend(), node_id="n1")
    with pytest.raises(InvalidSettingsError):
        node.register_subscriber(group="g", source=STREAMS, processor=Counting(), poll_interval=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        node.register_subscriber(group="g", source="orders", processor=Counting())  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        node.register_subscriber(group="g", source=STREAMS, processor="nothing")  # type: ignore[arg-type]
    assert node.subscribers == []
    node.register_subscriber(group="g", source=STREAMS, processor=Counting(), id="x")
    with pytest.raises(InvalidInputError):
        node.register_subscriber(group="g", source=STREAMS, processor=Counting(), id="x")
    with pytest.raises(InvalidSettingsError):
        EventProcessingNode(
            InMemoryBackend(), mode=NodeMode.OBSERVER, settings=NodeSettings(distributed=False)
        )
    with pytest.raises(InvalidInputError):
        EventProcessingNode("memory")  # type: ignore[arg-type]


def test_generated_node_ids_name_host_and_process() -> None:
    import os
    import socket

    first, second = EventProcessingNode(InMemoryBackend()), EventProcessingNode(InMemoryBackend())
    assert first.node_id.startswith(f"{socket.gethostname()}-{os.getpid()}-")
    assert first.node_id != second.node_id

"""OwnershipLease on a fake clock, consumers that stop mid-pass when it expires and
resume once it is renewed, and the distributed broker's wiring of it."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from eventmill import CategoryIdentifier, NewEvent
from eventmill.backends.memory import InMemoryBackend
from eventmill.broker.distributed import DistributedEventBroker, DistributedEventBrokerSettings
from eventmill.consumers import (
    ConsumerSettings,
    EventConsumerStateStore,
    EventSourceConsumer,
    make_subscriber,
)
from eventmill.consumers.lease import OwnershipLease, lease_margin
from eventmill.errors import InvalidInputError, InvalidSettingsError
from eventmill.events import StoredEvent
from eventmill.sources import EventSource
from eventmill.store import EventStore
from tests.unit.consumers.harness import KINDS, Recorder, processor_of

ORDERS = CategoryIdentifier("orders")
SECOND = timedelta(seconds=1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_lease_is_valid_for_its_duration_after_the_heartbeat_was_sent() -> None:
    clock = FakeClock()
    lease = OwnershipLease(3 * SECOND, clock=clock)
    assert not lease.is_valid()  # no heartbeat yet
    lease.renewed(clock.now - 0.5)  # sent half a second ago, no confirmation needed
    assert lease.is_valid()
    clock.now += 2.4
    assert lease.is_valid()
    clock.now += 0.1  # 3 s after the send: expired
    assert not lease.is_valid()
    lease.renewed(clock.now - 10)  # older than the latest: ignored
    assert not lease.is_valid()


def test_a_renewal_before_expiry_keeps_the_lease_valid_without_confirmation() -> None:
    clock = FakeClock()
    lease = OwnershipLease(3 * SECOND, clock=clock)
    lease.renewed(clock.now)
    for _ in range(10):
        clock.now += 2.9
        lease.renewed(clock.now)
        assert lease.is_valid()


def test_after_a_lapse_the_lease_waits_for_an_observer_round_begun_after_renewal() -> None:
    clock = FakeClock()
    lease = OwnershipLease(3 * SECOND, clock=clock)
    lease.renewed(clock.now)
    clock.now += 10  # paused: nobody looked, but the lease lapsed
    round_started = clock.now
    clock.now += 0.1
    lease.renewed(clock.now)
    clock.now += 0.1
    assert not lease.is_valid()
    lease.confirmed(round_started)  # began before the renewal: proves nothing
    assert not lease.is_valid()
    lease.confirmed(clock.now)
    assert lease.is_valid()
    clock.now += 3
    lease.confirmed(clock.now)  # confirming never extends the lease
    assert not lease.is_valid()


def test_lease_settings_are_checked() -> None:
    assert lease_margin(SECOND, 5 * SECOND) == 2 * SECOND
    assert lease_margin(timedelta(milliseconds=200), timedelta(milliseconds=1500)) == timedelta(
        milliseconds=650
    )
    with pytest.raises(InvalidSettingsError):
        lease_margin(SECOND, SECOND)
    with pytest.raises(InvalidSettingsError):
        OwnershipLease(timedelta(0))
    with pytest.raises(InvalidSettingsError):
        OwnershipLease(3)  # type: ignore[arg-type]


def test_the_default_broker_gives_a_lease_between_heartbeat_and_max_age() -> None:
    broker = DistributedEventBroker(InMemoryBackend(), node_id="n")
    assert broker.manager.lease.duration == 3 * SECOND
    assert broker.observer is not None and broker.observer.lease is broker.manager.lease


async def publish(backend: InMemoryBackend, count: int) -> None:
    stream = EventStore(backend).stream(category="orders", stream="s")
    for number in range(count):
        await stream.publish([NewEvent(name="happened", payload={"n": number})])


@pytest.mark.parametrize("kind", KINDS)
async def test_a_consumer_stops_at_the_next_event_once_its_lease_expired(kind: str) -> None:
    backend = InMemoryBackend()
    await publish(backend, 30)
    clock = FakeClock()
    lease = OwnershipLease(3 * SECOND, clock=clock)
    lease.renewed(clock.now)
    recorder = Recorder()

    def pause_at_4(event: StoredEvent) -> None:
        if event.sequence_number == 4:
            clock.now += 5  # the process was paused while handling event 4

    recorder.on_event = pause_at_4
    consumer = EventSourceConsumer(
        EventSource(backend, ORDERS, page_size=7),
        processor_of(kind, recorder),
        EventConsumerStateStore(backend.checkpoints, "g", ORDERS),
        settings=ConsumerSettings(checkpoint_every=10),
        lease=lease,
    )
    # event 4 had begun, so it completes; a transactional batch (1-10) completes whole
    last = 10 if kind == "transactional" else 4
    assert await consumer.consume_all() == last
    assert recorder.seen == list(range(1, last + 1))
    checkpoint = await backend.checkpoints.get("g", ORDERS)
    assert checkpoint is not None and checkpoint.after == last  # what it processed
    assert await consumer.consume_all() == 0  # still expired
    lease.renewed(clock.now)  # a heartbeat after the lapse...
    assert await consumer.consume_all() == 0  # ...is not enough
    lease.confirmed(clock.now)  # an observer round after it
    assert await consumer.consume_all() == 30 - last
    assert recorder.seen == list(range(1, 31))


async def test_a_subscriber_hands_its_lease_to_every_held_source() -> None:
    backend = InMemoryBackend()
    await publish(backend, 5)
    recorder = Recorder()
    subscriber = make_subscriber(
        backend, group="g", sources=ORDERS, processor=processor_of("each", recorder)
    )
    await subscriber.accept(ORDERS, 1)
    clock = FakeClock()
    lease = OwnershipLease(3 * SECOND, clock=clock)
    subscriber.lease = lease  # set after the source was accepted
    assert await subscriber.consume_all() == 0  # never renewed
    lease.renewed(clock.now)
    assert await subscriber.consume_all() == 5
    with pytest.raises(InvalidInputError):
        subscriber.lease = "forever"  # type: ignore[assignment]


async def test_a_distributed_broker_leases_its_subscribers_by_its_heartbeats() -> None:
    backend = InMemoryBackend()
    await publish(backend, 5)
    recorder = Recorder()
    subscriber = make_subscriber(
        backend, group="g", sources=ORDERS, processor=processor_of("each", recorder)
    )
    broker = DistributedEventBroker(
        backend,
        node_id="n",
        settings=DistributedEventBrokerSettings(
            subscriber_manager_heartbeat_interval=timedelta(milliseconds=30),
            subscriber_manager_subscriber_max_age=timedelta(milliseconds=300),
            coordinator_distribution_interval=timedelta(milliseconds=20),
            observer_synchronisation_interval=timedelta(milliseconds=20),
        ),
    )
    task = asyncio.create_task(broker.execute())
    try:
        await broker.register(subscriber)
        assert subscriber.lease is broker.manager.lease
        await broker.wait_ready()
        deadline = time.monotonic() + 5
        while len(recorder.seen) < 5:
            assert time.monotonic() < deadline, "not processed in time"
            await subscriber.consume_all()
            await asyncio.sleep(0.01)
        assert recorder.seen == [1, 2, 3, 4, 5]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

"""EventSubscriptionConsumer and make_subscriber: accept, withdraw during a batch,
epochs, wake-ups; and the subscriber protocol."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from eventmill import CategoryIdentifier, InvalidInputError, LogIdentifier, NewEvent
from eventmill.backends.base import Backend
from eventmill.backends.memory import InMemoryBackend
from eventmill.consumers import EventSubscriber, make_subscriber
from eventmill.services.status import ProcessStatus
from eventmill.store import EventStore
from tests.unit.consumers.harness import KINDS, Recorder, processor_of

ORDERS = CategoryIdentifier("orders")


async def publish(backend: Backend, count: int, category: str = "orders") -> None:
    stream = EventStore(backend).stream(category=category, stream="s")
    for number in range(count):
        await stream.publish([NewEvent(name="happened", payload={"n": number})])


@pytest.mark.parametrize("kind", KINDS)
async def test_withdraw_during_a_batch_finishes_it_and_saves(kind: str) -> None:
    backend = InMemoryBackend()
    await publish(backend, 30)
    recorder = Recorder(block_at=5)
    subscriber = make_subscriber(
        backend,
        group="g",
        sources=ORDERS,
        processor=processor_of(kind, recorder),
        checkpoint_every=10,
    )
    assert isinstance(subscriber, EventSubscriber)
    await subscriber.accept(ORDERS, 1)
    passing = asyncio.create_task(subscriber.consume_all())
    await recorder.reached.wait()
    assert subscriber.health() == ProcessStatus.RUNNING
    withdrawing = asyncio.create_task(subscriber.withdraw(ORDERS))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not withdrawing.done()  # the batch is still in flight
    recorder.release.set()
    await withdrawing
    finished = 10 if kind == "transactional" else 5
    checkpoint = await backend.checkpoints.get("g", ORDERS)
    assert checkpoint is not None and (checkpoint.after, checkpoint.epoch) == (finished, 1)
    assert await passing == finished
    assert dict(subscriber.sources) == {}
    assert await subscriber.consume_all() == 0
    await subscriber.withdraw(ORDERS)  # harmless when not held


async def test_accept_twice_is_harmless_and_a_fenced_source_is_dropped() -> None:
    backend = InMemoryBackend()
    await publish(backend, 3)
    recorder = Recorder()
    subscriber = make_subscriber(
        backend, group="g", sources=[ORDERS], processor=recorder.handle, id="one"
    )
    assert subscriber.health() == ProcessStatus.INITIALISED
    await backend.checkpoints.fence("g", ORDERS, 2)
    await subscriber.accept(ORDERS, 2)
    await subscriber.accept(ORDERS, 3)
    await subscriber.accept(ORDERS, 1)
    assert dict(subscriber.sources) == {ORDERS: 3}
    assert await subscriber.consume_all() == 3
    assert subscriber.health() == ProcessStatus.WAITING
    stored = await backend.checkpoints.get("g", ORDERS)
    assert stored is not None and (stored.after, stored.epoch) == (3, 3)
    await backend.checkpoints.fence("g", ORDERS, 4)  # the source moved elsewhere
    await publish(backend, 2)
    assert await subscriber.consume_all() == 0
    assert dict(subscriber.sources) == {}
    stored = await backend.checkpoints.get("g", ORDERS)
    assert stored is not None and stored.after == 3
    assert recorder.seen == [1, 2, 3, 4, 5]  # a zombie may work; it cannot move the checkpoint


async def test_each_source_has_its_own_checkpoint() -> None:
    backend = InMemoryBackend()
    await publish(backend, 4, "orders")
    await publish(backend, 2, "payments")
    recorder = Recorder()
    payments = CategoryIdentifier("payments")
    subscriber = make_subscriber(
        backend, group="g", sources=[ORDERS, payments], processor=recorder.handle
    )
    await subscriber.accept(ORDERS, 1)
    await subscriber.accept(payments, 1)
    assert await subscriber.execute() == 6
    listed = {c.source: c.after for c in await backend.checkpoints.list("g")}
    assert listed == {ORDERS: 4, payments: 6}


async def test_a_log_subscriber_does_not_see_its_own_checkpoints(backend: Backend) -> None:
    await publish(backend, 20)
    recorder = Recorder()
    subscriber = make_subscriber(
        backend,
        group="log-reader",
        sources=LogIdentifier(),
        processor=recorder.handle,
        checkpoint_every=1,
    )
    await subscriber.accept(LogIdentifier(), 1)
    assert await subscriber.consume_all() == 20
    assert await subscriber.consume_all() == 0
    assert len(await EventStore(backend).log().read()) == 20
    checkpoint = await backend.checkpoints.get("log-reader", LogIdentifier())
    assert checkpoint is not None and checkpoint.version == 20
    assert len(recorder.seen) == 20


async def test_a_publish_wakes_subscribers_of_its_category(backend: Backend) -> None:
    recorder = Recorder()
    subscriber = make_subscriber(backend, group="g", sources=ORDERS, processor=recorder.handle)
    woken: list[int] = []
    stop = subscriber.on_new_events(lambda: woken.append(1))
    await subscriber.accept(ORDERS, 1)
    await subscriber.consume_all()
    woken.clear()
    await publish(backend, 1, "other")
    await publish(backend, 1, "orders")
    assert await subscriber.wait_for_new_events(within=timedelta(seconds=10))
    assert woken
    assert await subscriber.consume_all() == 1
    stop()
    await subscriber.withdraw(ORDERS)
    woken.clear()
    await publish(backend, 1, "orders")
    assert not await subscriber.wait_for_new_events(within=timedelta(milliseconds=50))
    assert woken == []


async def test_bad_subscriber_arguments_are_refused() -> None:
    backend = InMemoryBackend()
    with pytest.raises(InvalidInputError):
        make_subscriber(backend, group="g", sources=[], processor=Recorder().handle)
    with pytest.raises(InvalidInputError):
        make_subscriber(backend, group="g", sources=ORDERS, processor=object())  # type: ignore[arg-type]
    subscriber = make_subscriber(backend, group="g", sources=ORDERS, processor=Recorder().handle)
    with pytest.raises(InvalidInputError):
        await subscriber.accept(ORDERS, -1)

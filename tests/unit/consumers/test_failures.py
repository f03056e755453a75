"""Failure policies of EventSourceConsumer on the in-memory backend: per-event retries
with backoff (injected clock), park (ordered holding, moving with the source), skip,
stop group, stop node, operators' retry and skip, exactly-once with transactions."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta

import pytest

from eventmill import CategoryIdentifier, NewEvent, StreamIdentifier
from eventmill.backends.base import Backend, ConsumerTransaction, ParkedRequest, ParkedStream
from eventmill.backends.memory import InMemoryBackend
from eventmill.consumers import (
    EventConsumerStateStore,
    EventProcessor,
    EventSourceConsumer,
    TransactionalEventProcessor,
)
from eventmill.consumers.failures import (
    FailureAction,
    FailurePolicy,
    parked_streams,
    retry_parked,
    skip_parked,
)
from eventmill.consumers.source_consumer import ConsumerSettings
from eventmill.consumers.subscription_consumer import make_subscriber
from eventmill.errors import (
    InvalidInputError,
    InvalidSettingsError,
    ProcessorFailedError,
    StaleEpochError,
)
from eventmill.events import StoredEvent
from eventmill.groups import reset_group, retire_group
from eventmill.projections import ProjectionStore
from eventmill.services.error_handlers import ConstantBackoff, ExponentialBackoff
from eventmill.services.status import ProcessStatus
from eventmill.sources import EventSource
from eventmill.store import EventStore

ORDERS = CategoryIdentifier("orders")
BAD = StreamIdentifier("orders", "bad")


class Clock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Handler(EventProcessor):
    """Records (stream, position) in order; raises on the events in ``poison``."""

    def __init__(self, poison: Sequence[tuple[str, int]] = ()) -> None:
        self.poison = set(poison)
        self.seen: list[tuple[str, int]] = []
        self.tries: list[tuple[str, int]] = []

    async def process_event(self, event: StoredEvent) -> None:
        self.tries.append((event.stream, event.position))
        if (event.stream, event.position) in self.poison:
            raise KeyError(f"no total in {event.stream}")
        self.seen.append((event.stream, event.position))


class Projecting(TransactionalEventProcessor):
    """Counts each event in a projection, in the batch's transaction; raises (after its
    write) on the events in ``poison``, so a failing batch has partial writes."""

    def __init__(self, backend: Backend, poison: Sequence[tuple[str, int]] = ()) -> None:
        self.store = ProjectionStore(backend, "applied")
        self.poison = set(poison)

    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        for event in events:
            key = f"{event.stream}:{event.position}"
            found = await self.store.get(key, transaction=transaction)
            count = 0 if found is None else int(found.state["count"])  # type: ignore[arg-type]
            await self.store.save(key, {"count": count + 1}, transaction=transaction)
            if (event.stream, event.position) in self.poison:
                raise ValueError(f"cannot apply {key}")

    async def counts(self) -> dict[str, int]:
        return {p.id: int(p.state["count"]) for p in await self.store.find(limit=1000)}  # type: ignore[arg-type]


async def publish(backend: Backend, *streams: str) -> None:
    store = EventStore(backend)
    for stream in streams:
        await store.stream(category="orders", stream=stream).publish(
            [NewEvent(name="order-placed", payload={})]
        )


def consumer(
    backend: Backend,
    processor: EventProcessor | TransactionalEventProcessor,
    policy: FailurePolicy,
    *,
    every: int = 100,
) -> EventSourceConsumer:
    return EventSourceConsumer(
        EventSource(backend, ORDERS),
        processor,
        EventConsumerStateStore(backend.checkpoints, "g", ORDERS),
        settings=ConsumerSettings(checkpoint_every=every),
        failure_policy=policy,
    )


def at_once(attempts: int = 1, then: FailureAction = FailureAction.PARK) -> FailurePolicy:
    return FailurePolicy(max_attempts=attempts, backoff=ConstantBackoff(), then=then)


async def test_retries_wait_out_the_backoff_on_the_injected_clock() -> None:
    backend = InMemoryBackend()
    await publish(backend, "a", "bad", "a", "b")
    clock = Clock()
    backoff = ExponentialBackoff(
        initial=timedelta(seconds=1),
        maximum=timedelta(seconds=1.5),
        multiplier=2,
        jitter=0.5,
        random=lambda: 0.5,
    )
    policy = FailurePolicy(max_attempts=4, backoff=backoff, clock=clock)
    handler = Handler(poison=[("bad", 0)])
    subject = consumer(backend, handler, policy)
    assert await subject.consume_all() == 1  # "a" 0, then "bad" fails: wait 0.75 s
    assert subject.retrying and handler.tries == [("a", 0), ("bad", 0)]
    for done, wait in enumerate((0.75, 1.125, 1.125)):  # 1, then 2 capped at 1.5, x 0.75
        clock.now += wait - 0.001
        assert await subject.consume_all() == 0
        assert len(handler.tries) == 2 + done
        clock.now += 0.001
        tries = len(handler.tries)
        await subject.consume_all()
        assert handler.tries[tries] == ("bad", 0)
    assert not subject.retrying
    assert handler.tries.count(("bad", 0)) == 4
    assert handler.seen == [("a", 0), ("a", 1), ("b", 0)]
    [record] = subject.parked
    assert (record.attempts, record.stream, record.position) == (4, BAD, 0)


async def test_park_holds_the_stream_in_order_while_the_rest_flows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = InMemoryBackend()
    await publish(backend, "a", "bad", "b", "bad", "a", "bad")
    handler = Handler(poison=[("bad", 0)])
    subject = consumer(backend, handler, at_once(2), every=2)
    with caplog.at_level(logging.WARNING):
        assert await subject.consume_all() == 1
        assert await subject.consume_all() == 5
    assert handler.seen == [("a", 0), ("b", 0), ("a", 1)]
    assert (await backend.checkpoints.get("g", ORDERS)).after == 6  # type: ignore[union-attr]
    [record] = await parked_streams(backend)
    assert (record.group, record.source, record.stream) == ("g", ORDERS, BAD)
    assert (record.sequence_number, record.position, record.event_name) == (2, 0, "order-placed")
    assert (record.held, record.last_held, record.attempts) == (3, 6, 2)
    assert (record.error_type, record.error_message) == ("KeyError", "'no total in bad'")
    assert "Traceback" in record.traceback and "KeyError" in record.traceback
    assert record.first_failed_at <= record.last_failed_at
    lines = [r.getMessage() for r in caplog.records]
    assert all("\n" not in line for line in lines)
    assert any(
        "group g, source category:orders, stream orders/bad, position 0, sequence number 2,"
        " event order-placed: failed 2 times (KeyError" in line
        for line in lines
    )
    await publish(backend, "bad", "b")
    assert await subject.consume_all() == 2
    assert handler.seen[-1] == ("b", 1)
    [record] = await backend.parked.list()
    assert record.held == 4


async def test_a_parked_stream_stays_held_by_the_next_holder() -> None:
    backend = InMemoryBackend()
    await publish(backend, "bad", "a")
    await consumer(backend, Handler(poison=[("bad", 0)]), at_once()).consume_all()
    await publish(backend, "bad", "a")
    fixed = Handler()
    successor = consumer(backend, fixed, at_once())  # another node, after a rebalance
    assert await successor.consume_all() == 2
    assert fixed.seen == [("a", 1)]
    assert [r.stream for r in successor.parked] == [BAD]
    [record] = await backend.parked.list()
    assert record.held == 2


async def test_retry_replays_the_held_events_in_order_then_the_stream_flows() -> None:
    backend = InMemoryBackend()
    await publish(backend, "bad", "a", "bad", "bad")
    handler = Handler(poison=[("bad", 0)])
    subject = consumer(backend, handler, at_once())
    await subject.consume_all()
    with pytest.raises(InvalidInputError, match="not parked"):
        await retry_parked(backend, "g", StreamIdentifier("orders", "a"))
    assert await retry_parked(backend, "g", BAD) == 1
    handler.poison.clear()  # the fix is deployed
    await publish(backend, "bad")
    assert await subject.consume_all() == 4
    assert handler.seen == [("a", 0), ("bad", 0), ("bad", 1), ("bad", 2), ("bad", 3)]
    assert await backend.parked.list() == [] and subject.parked == ()


async def test_a_retry_that_fails_again_parks_at_that_event() -> None:
    backend = InMemoryBackend()
    await publish(backend, "bad", "bad", "bad")
    handler = Handler(poison=[("bad", 0), ("bad", 1)])
    subject = consumer(backend, handler, at_once())
    await subject.consume_all()
    await retry_parked(backend, "g", BAD)
    handler.poison = {("bad", 1)}
    await subject.consume_all()
    [record] = await backend.parked.list()
    assert (record.position, record.held, record.request) == (1, 2, None)
    assert handler.seen == [("bad", 0)]


async def test_operator_skip_records_through_a_sequence_number_and_replays_the_rest() -> None:
    backend = InMemoryBackend()
    await publish(backend, "bad", "bad", "a", "bad")
    handler = Handler(poison=[("bad", 0), ("bad", 1)])
    subject = consumer(backend, handler, at_once())
    await subject.consume_all()
    assert await skip_parked(backend, "g", BAD, through=2) == 1
    await subject.consume_all()
    assert handler.seen == [("a", 0), ("bad", 2)]
    skipped = await backend.parked.skipped(group="g")
    assert [(s.position, s.reason, s.error_type) for s in skipped] == [
        (0, "operator", ""),
        (1, "operator", ""),
    ]
    assert await backend.parked.list() == []
    with pytest.raises(InvalidInputError):
        await skip_parked(backend, "g", BAD, through=-1)


async def test_skip_policy_records_the_event_and_goes_on() -> None:
    backend = InMemoryBackend()
    await publish(backend, "bad", "bad", "a")
    handler = Handler(poison=[("bad", 0)])
    subject = consumer(backend, handler, at_once(then=FailureAction.SKIP))
    assert await subject.consume_all() == 3
    assert handler.seen == [("bad", 1), ("a", 0)]
    [skipped] = await backend.parked.skipped()
    assert (skipped.stream, skipped.position, skipped.reason) == (BAD, 0, "policy")
    assert skipped.error_type == "KeyError"
    assert await backend.parked.list() == []


async def test_stop_node_raises_naming_the_event_after_saving_progress() -> None:
    backend = InMemoryBackend()
    await publish(backend, "a", "bad", "a")
    subject = consumer(backend, Handler(poison=[("bad", 0)]), at_once(then=FailureAction.STOP_NODE))
    with pytest.raises(ProcessorFailedError) as raised:
        await subject.consume_all()
    assert raised.value.stops_node and isinstance(raised.value.__cause__, KeyError)
    assert str(raised.value).startswith(
        "group g, source category:orders, stream orders/bad, position 0, sequence number 2, "
        "event order-placed: failed 1 times (KeyError"
    )
    assert (await backend.checkpoints.get("g", ORDERS)).after == 1  # type: ignore[union-attr]


async def test_stop_group_stops_only_that_subscriber() -> None:
    backend = InMemoryBackend()
    await publish(backend, "a", "bad", "a")
    handler = Handler(poison=[("bad", 0)])
    stopping = make_subscriber(
        backend,
        group="g",
        sources=ORDERS,
        processor=handler,
        failure_policy=at_once(then=FailureAction.STOP_GROUP),
    )
    other = Handler()
    healthy = make_subscriber(
        backend, group="h", sources=ORDERS, processor=other, failure_policy=at_once()
    )
    for subscriber in (stopping, healthy):
        await subscriber.accept(ORDERS, 1)
        await subscriber.consume_all()
    assert stopping.health() is ProcessStatus.ERRORED and stopping.stopped_by is not None
    assert healthy.health() is ProcessStatus.WAITING
    await publish(backend, "b")
    assert await stopping.consume_all() == 0
    assert await healthy.consume_all() == 1
    assert handler.seen == [("a", 0)] and len(other.seen) == 4


async def test_a_subscriber_is_degraded_while_retrying_or_parked() -> None:
    backend = InMemoryBackend()
    await publish(backend, "bad")
    clock = Clock()
    policy = FailurePolicy(
        max_attempts=2, backoff=ConstantBackoff(timedelta(seconds=5)), clock=clock
    )
    handler = Handler(poison=[("bad", 0)])
    subscriber = make_subscriber(
        backend, group="g", sources=ORDERS, processor=handler, failure_policy=policy
    )
    await subscriber.accept(ORDERS, 1)
    await subscriber.consume_all()
    assert subscriber.health() is ProcessStatus.DEGRADED  # waiting for try 2
    clock.now += 5
    await subscriber.consume_all()
    assert subscriber.health() is ProcessStatus.DEGRADED and len(subscriber.parked) == 1
    await retry_parked(backend, "g", BAD)
    handler.poison.clear()
    await subscriber.consume_all()
    assert subscriber.health() is ProcessStatus.WAITING
    assert not subscriber.parked


@pytest.mark.parametrize("then", [FailureAction.PARK, FailureAction.SKIP])
async def test_transactional_processing_stays_exactly_once(then: FailureAction) -> None:
    backend = InMemoryBackend()
    await publish(backend, "a", "b", "bad", "a", "bad", "b", "a")
    processor = Projecting(backend, poison=[("bad", 0)])
    subject = consumer(backend, processor, at_once(2, then), every=4)
    await subject.consume_all()
    await subject.consume_all()
    counts = await processor.counts()
    good = {"a:0", "a:1", "a:2", "b:0", "b:1"}
    if then is FailureAction.PARK:
        assert counts == dict.fromkeys(good, 1)
        processor.poison.clear()
        await retry_parked(backend, "g", BAD)
        await subject.consume_all()
        assert await processor.counts() == dict.fromkeys(good | {"bad:0", "bad:1"}, 1)
    else:
        assert counts == dict.fromkeys(good | {"bad:1"}, 1)
        [skipped] = await backend.parked.skipped()
        assert skipped.position == 0
    assert await backend.parked.list() == []
    assert (await backend.checkpoints.get("g", ORDERS)).after == 7  # type: ignore[union-attr]


def test_bad_policies_are_refused() -> None:
    with pytest.raises(InvalidSettingsError):
        FailurePolicy(max_attempts=0)
    with pytest.raises(InvalidSettingsError):
        FailurePolicy(then="park")  # type: ignore[arg-type]
    with pytest.raises(InvalidSettingsError):
        FailurePolicy(backoff=timedelta(1))  # type: ignore[arg-type]


async def test_a_new_holder_recounts_held_events_a_crash_did_not_count() -> None:
    backend = InMemoryBackend()
    await publish(backend, "bad", "bad", "a", "bad")
    await consumer(backend, Handler(poison=[("bad", 0)]), at_once()).consume_all()
    [record] = await backend.parked.list()
    assert record.held == 3
    await backend.parked.park(replace(record, held=1))  # as if killed before counting
    successor = consumer(backend, Handler(), at_once())
    assert await successor.consume_all() == 0
    [record] = await backend.parked.list()
    assert record.held == 3


async def test_retiring_a_group_deletes_its_parked_streams() -> None:
    backend = InMemoryBackend()
    await publish(backend, "bad")
    await consumer(backend, Handler(poison=[("bad", 0)]), at_once()).consume_all()
    [record] = await backend.parked.list()
    await backend.parked.park(replace(record, group="other"))
    await retire_group(backend, "g")
    assert [r.group for r in await backend.parked.list()] == ["other"]


async def test_a_subscriber_reads_parked_streams_only_when_it_may_have_some() -> None:
    backend = InMemoryBackend()
    await publish(backend, "a", "bad")
    reads = 0
    original = backend.parked.list

    async def counted(**kwargs: object) -> list[ParkedStream]:
        nonlocal reads
        reads += 1
        return await original(**kwargs)  # type: ignore[arg-type]

    backend.parked.list = counted  # type: ignore[method-assign]
    handler = Handler()
    subscriber = make_subscriber(
        backend, group="g", sources=ORDERS, processor=handler, failure_policy=at_once()
    )
    await subscriber.accept(ORDERS, 1)
    for _ in range(3):
        await subscriber.consume_all()
    assert reads == 1  # after the accept only
    handler.poison = {("bad", 1)}
    await publish(backend, "bad")
    await subscriber.consume_all()  # parks the stream
    await subscriber.consume_all()
    await subscriber.consume_all()
    assert reads == 3  # every pass while something is parked


async def test_a_zombie_holder_parks_nothing_in_a_source_that_moved() -> None:
    backend = InMemoryBackend()
    await publish(backend, "a", "bad")
    handler = Handler(poison=[("bad", 0)])
    zombie = EventSourceConsumer(
        EventSource(backend, ORDERS),
        handler,
        EventConsumerStateStore(backend.checkpoints, "g", ORDERS, epoch=1),
        failure_policy=at_once(),
    )
    await backend.checkpoints.fence("g", ORDERS, 2)  # the source moved to a new holder
    with pytest.raises(StaleEpochError):
        await zombie.consume_all()
    assert handler.tries == [("a", 0), ("bad", 0)]
    assert await backend.parked.list() == []


async def test_a_new_holder_goes_on_counting_the_tries(backend: Backend) -> None:
    await publish(backend, "a", "bad", "b")
    policy = at_once(attempts=3)
    first = Handler(poison=[("bad", 0)])
    holder = consumer(backend, first, policy)
    await holder.consume_all()
    await holder.consume_all()  # two tries, then the holder dies
    [stored] = await parked_streams(backend)
    assert (stored.stream, stored.retrying, stored.attempts) == (BAD, True, 2)
    successor = Handler(poison=[("bad", 0)])
    await consumer(backend, successor, policy).consume_all()
    assert successor.tries == [("bad", 0), ("b", 0)]  # the third and last try: parked
    assert successor.seen == [("b", 0)]
    [record] = await parked_streams(backend)
    assert (record.retrying, record.held, record.attempts) == (False, 1, 3)
    assert record.first_failed_at == stored.first_failed_at


async def test_stored_tries_are_deleted_once_the_event_passes(backend: Backend) -> None:
    await publish(backend, "a", "bad", "b")
    await consumer(backend, Handler(poison=[("bad", 0)]), at_once(attempts=3)).consume_all()
    [stored] = await parked_streams(backend)
    assert stored.retrying
    fixed = Handler()
    successor = consumer(backend, fixed, at_once(attempts=3))
    await successor.consume_all()
    assert fixed.seen == [("bad", 0), ("b", 0)]
    assert not successor.retrying
    assert await parked_streams(backend) == []


async def test_a_reset_replay_is_not_blocked_by_the_parks_before_it(backend: Backend) -> None:
    await publish(backend, "a", "bad", "bad", "b")
    await consumer(backend, Handler(poison=[("bad", 0)]), at_once()).consume_all()
    assert [r.held for r in await parked_streams(backend)] == [2]
    [checkpoint] = await reset_group(backend, "g", to_start=True)
    fixed = Handler()  # the fix deployed, then the group replayed from the start
    replay = EventSourceConsumer(
        EventSource(backend, ORDERS),
        fixed,
        EventConsumerStateStore(backend.checkpoints, "g", ORDERS, epoch=checkpoint.epoch),
        failure_policy=at_once(),
    )
    await replay.consume_all()
    assert fixed.seen == [("a", 0), ("bad", 0), ("bad", 1), ("b", 0)]
    assert await parked_streams(backend) == []


async def test_a_zombie_replays_no_held_event_of_a_source_that_moved(backend: Backend) -> None:
    await publish(backend, "bad", "a", "bad")
    projecting = Projecting(backend, poison=[("bad", 0)])
    zombie = EventSourceConsumer(
        EventSource(backend, ORDERS),
        projecting,
        EventConsumerStateStore(backend.checkpoints, "g", ORDERS, epoch=1),
        failure_policy=at_once(),
    )
    await zombie.consume_all()
    assert await projecting.counts() == {"a:0": 1}
    projecting.poison = set()
    await retry_parked(backend, "g", BAD)
    await backend.checkpoints.fence("g", ORDERS, 2)  # the source moved meanwhile
    with pytest.raises(StaleEpochError):
        await zombie.consume_all()
    assert await projecting.counts() == {"a:0": 1}  # its replay rolled back
    [record] = await parked_streams(backend)
    assert (record.position, record.held, record.request) == (0, 2, ParkedRequest.RETRY)


async def test_a_recount_before_the_first_held_event_keeps_it_held(backend: Backend) -> None:
    await publish(backend, "x", "bad", "bad")
    first, second = await EventSource(backend, BAD).read(after=None)
    record = ParkedStream(  # parked by a holder that died before saving its checkpoint
        group="g",
        source=ORDERS,
        stream=BAD,
        sequence_number=first.sequence_number,
        position=0,
        event_name=first.name,
        held=1,
        last_held=first.sequence_number,
        error_type="KeyError",
        error_message="'total'",
        traceback="",
        attempts=1,
        first_failed_at=first.observed_at,
        last_failed_at=first.observed_at,
    )
    await backend.parked.park(record)
    successor = consumer(backend, Handler(poison=[("x", 0)]), at_once(attempts=2))
    await successor.consume_all()  # x waits for another try before "bad" is reached

    async def bad() -> ParkedStream:
        return next(r for r in await parked_streams(backend) if r.stream == BAD)

    assert await bad() == record  # still parked, holding its first event
    await successor.consume_all()  # x parked too; "bad" reached and held
    assert ((await bad()).held, (await bad()).last_held) == (2, second.sequence_number)

"""The parked-stream storage contract, run against every backend."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from eventmill import CategoryIdentifier, StreamIdentifier
from eventmill.backends.base import Backend, ParkedRequest, ParkedStream, SkippedEvent
from eventmill.errors import StaleEpochError
from eventmill.events import CategoryPartitionIdentifier

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
ORDERS = CategoryIdentifier("orders")
ORDER_7 = StreamIdentifier("orders", "order-7")


def parked(
    group: str = "totals",
    source: CategoryIdentifier | CategoryPartitionIdentifier = ORDERS,
    stream: StreamIdentifier = ORDER_7,
    **changes: object,
) -> ParkedStream:
    record = ParkedStream(
        group=group,
        source=source,
        stream=stream,
        sequence_number=41,
        position=3,
        event_name="order-placed",
        held=1,
        last_held=41,
        error_type="KeyError",
        error_message="'total'",
        traceback="Traceback (most recent call last):\n  ...\nKeyError: 'total'\n",
        attempts=3,
        first_failed_at=T0,
        last_failed_at=T0 + timedelta(seconds=2),
    )
    return replace(record, **changes)  # type: ignore[arg-type]


async def test_park_list_replace_remove(backend: Backend) -> None:
    store = backend.parked
    assert await store.list() == []
    record = parked()
    await store.park(record)
    assert await store.list() == [record]
    assert await store.list(group="totals", source=ORDERS) == [record]
    assert await store.list(group="other") == []
    assert await store.list(source=StreamIdentifier("orders", "order-7")) == []
    moved = replace(record, sequence_number=45, position=4, event_name="order-paid", held=2)
    await store.park(moved)
    assert await store.list() == [moved]
    assert await store.remove("totals", ORDERS, ORDER_7) is True
    assert await store.remove("totals", ORDERS, ORDER_7) is False
    assert await store.list() == []


async def test_list_orders_by_group_source_and_stream(backend: Backend) -> None:
    store = backend.parked
    partition = CategoryPartitionIdentifier("orders", 1, 4)
    records = [
        parked(group="b", stream=StreamIdentifier("orders", "x")),
        parked(group="a", stream=StreamIdentifier("orders", "y")),
        parked(group="a", stream=StreamIdentifier("orders", "x")),
        parked(group="a", source=partition, stream=StreamIdentifier("orders", "x")),
    ]
    for record in records:
        await store.park(record)
    found = await store.list()
    assert [(r.group, r.stream.stream) for r in found][-1] == ("b", "x")
    assert [r.group for r in found] == ["a", "a", "a", "b"]
    group_a = await store.list(group="a")
    assert len(group_a) == 3 and set(group_a) == set(records[1:])
    assert await store.list(group="a", source=partition) == [records[3]]
    assert await store.list(source=ORDERS) == [records[2], records[1], records[0]]


async def test_hold_counts_each_later_place_once(backend: Backend) -> None:
    store = backend.parked
    await store.park(parked())
    assert await store.hold("totals", ORDERS, ORDER_7, [50]) == 2
    assert await store.hold("totals", ORDERS, ORDER_7, [44, 50]) == 2  # replayed pass
    assert await store.hold("totals", ORDERS, ORDER_7, [50, 60, 77]) == 4
    [record] = await store.list()
    assert (record.held, record.last_held) == (4, 77)
    assert await store.hold("totals", ORDERS, StreamIdentifier("orders", "nope"), [90]) is None


async def test_request_marks_the_stream_in_every_source_of_the_group(backend: Backend) -> None:
    store = backend.parked
    partition = CategoryPartitionIdentifier("orders", 0, 2)
    await store.park(parked())
    await store.park(parked(source=partition))
    await store.park(parked(group="other"))
    assert await store.request("totals", ORDER_7, ParkedRequest.SKIP, skip_through=44) == 2
    for record in await store.list(group="totals"):
        assert (record.request, record.skip_through) == (ParkedRequest.SKIP, 44)
    [other] = await store.list(group="other")
    assert other.request is None
    assert await store.request("totals", StreamIdentifier("orders", "z"), ParkedRequest.RETRY) == 0
    assert await store.request("totals", ORDER_7, ParkedRequest.RETRY) == 2
    assert {r.request for r in await store.list(group="totals")} == {ParkedRequest.RETRY}
    assert {r.skip_through for r in await store.list(group="totals")} == {None}


async def test_park_keeps_a_request_that_only_clear_request_clears(backend: Backend) -> None:
    store = backend.parked
    await store.park(parked())
    await store.request("totals", ORDER_7, ParkedRequest.SKIP, skip_through=50)
    await store.park(parked(position=4, held=3))  # the holder's progress
    [record] = await store.list()
    assert (record.position, record.held) == (4, 3)
    assert (record.request, record.skip_through) == (ParkedRequest.SKIP, 50)
    assert await store.clear_request("totals", ORDERS, ORDER_7, ParkedRequest.RETRY) is False
    assert (await store.list())[0].request is ParkedRequest.SKIP
    assert await store.clear_request("totals", ORDERS, ORDER_7, ParkedRequest.SKIP) is True
    [record] = await store.list()
    assert (record.request, record.skip_through) == (None, None)
    assert await store.clear_request("totals", ORDERS, ORDER_7, ParkedRequest.SKIP) is False


def skipped_event(n: int = 0, group: str = "totals") -> SkippedEvent:
    return SkippedEvent(
        group=group,
        source=ORDERS,
        stream=ORDER_7,
        sequence_number=41 + n,
        position=3 + n,
        event_name="order-placed",
        reason="policy" if n == 0 else "operator",
        error_type="KeyError" if n == 0 else "",
        error_message="'total'" if n == 0 else "",
        skipped_at=T0 + timedelta(seconds=n),
    )


async def test_a_holder_with_a_stale_epoch_changes_nothing(backend: Backend) -> None:
    store = backend.parked
    await backend.checkpoints.fence("totals", ORDERS, 5)
    record = parked()
    await store.park(record, epoch=5)
    await store.request("totals", ORDER_7, ParkedRequest.RETRY)  # operators are not fenced
    other = StreamIdentifier("orders", "order-8")
    writes = [
        store.park(replace(record, held=9), epoch=4),
        store.park(parked(stream=other), epoch=4),
        store.hold("totals", ORDERS, ORDER_7, [50], epoch=4),
        store.hold("totals", ORDERS, other, [50], epoch=4),
        store.remove("totals", ORDERS, ORDER_7, epoch=4),
        store.clear_request("totals", ORDERS, ORDER_7, ParkedRequest.RETRY, epoch=4),
        store.record_skipped(skipped_event(), epoch=4),
    ]
    for write in writes:
        with pytest.raises(StaleEpochError, match=r"'totals' in category:orders: epoch 4 is"):
            await write

    async def park_then_hold_stale() -> None:
        async with backend.checkpoints.transaction() as transaction:
            await store.park(parked(stream=other), transaction=transaction, epoch=5)
            await store.hold("totals", ORDERS, ORDER_7, [50], transaction=transaction, epoch=4)

    with pytest.raises(StaleEpochError):
        await park_then_hold_stale()
    [kept] = await store.list()
    assert kept == replace(record, request=ParkedRequest.RETRY)
    assert await store.skipped() == []
    await backend.checkpoints.fence("totals", ORDERS, 6)  # the source moved on again
    with pytest.raises(StaleEpochError):
        await store.hold("totals", ORDERS, ORDER_7, [50], epoch=5)
    assert await store.hold("totals", ORDERS, ORDER_7, [50], epoch=6) == 2
    assert await store.hold("totals", ORDERS, other, [50], epoch=6) is None
    assert await store.clear_request("totals", ORDERS, ORDER_7, ParkedRequest.RETRY, epoch=6)
    await store.record_skipped(skipped_event(), epoch=6)
    assert await store.remove("totals", ORDERS, ORDER_7, epoch=6) is True
    assert await store.remove("totals", ORDERS, ORDER_7, epoch=6) is False
    await store.park(parked(group="fresh"), epoch=1)  # no checkpoint yet: nothing to fence
    assert [r.group for r in await store.list()] == ["fresh"]
    assert len(await store.skipped()) == 1


async def test_skipped_events_are_kept_in_order(backend: Backend) -> None:
    store = backend.parked
    events = [skipped_event(n, group) for n, group in enumerate(["totals", "other", "totals"])]
    for event in reversed(events):
        await store.record_skipped(event)
    assert await store.skipped(group="totals") == [events[0], events[2]]
    assert await store.skipped() == [events[1], events[0], events[2]]


async def test_writes_in_a_transaction_roll_back_with_it(backend: Backend) -> None:
    store = backend.parked
    await store.park(parked())

    async def write_then_fail() -> None:
        async with backend.checkpoints.transaction() as transaction:
            await store.park(
                parked(stream=StreamIdentifier("orders", "other")), transaction=transaction
            )
            assert await store.hold("totals", ORDERS, ORDER_7, [60], transaction=transaction) == 2
            assert await store.remove("totals", ORDERS, ORDER_7, transaction=transaction)
            await store.record_skipped(
                SkippedEvent(
                    group="totals",
                    source=ORDERS,
                    stream=ORDER_7,
                    sequence_number=60,
                    position=9,
                    event_name="x",
                    reason="policy",
                    error_type="E",
                    error_message="m",
                    skipped_at=T0,
                ),
                transaction=transaction,
            )
            raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        await write_then_fail()
    assert await store.list() == [parked()]
    assert await store.skipped() == []
    async with backend.checkpoints.transaction() as transaction:
        assert await store.hold("totals", ORDERS, ORDER_7, [60], transaction=transaction) == 2
    [record] = await store.list()
    assert record.held == 2

"""The SubscriptionStateStore contract (who holds what), run against every backend."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from eventmill import (
    CategoryIdentifier,
    CategoryPartitionIdentifier,
    ConflictError,
    InvalidIdentifierError,
    InvalidInputError,
    LogIdentifier,
    StreamIdentifier,
)
from eventmill.backends.base import (
    Assign,
    Backend,
    HoldingState,
    Release,
    Remove,
    Revoke,
    SourceHolding,
    SubscriptionChange,
)
from eventmill.events import EventSourceIdentifier

ORDERS = CategoryIdentifier("orders")
LOG = LogIdentifier()
STREAM = StreamIdentifier("orders", "o-1")
PART = CategoryPartitionIdentifier("orders", 3, 8)


def assign(
    source: EventSourceIdentifier,
    subscriber: str,
    epoch: int,
    *,
    group: str = "g",
    node: str = "n1",
    dead_after: timedelta | None = None,
) -> Assign:
    return Assign(
        group=group,
        source=source,
        subscriber_id=subscriber,
        node_id=node,
        epoch=epoch,
        holder_dead_after=dead_after,
    )


def holding(
    source: EventSourceIdentifier,
    subscriber: str | None,
    epoch: int,
    state: HoldingState = HoldingState.ASSIGNED,
    *,
    group: str = "g",
    node: str | None = "n1",
) -> SourceHolding:
    return SourceHolding(
        group=group,
        source=source,
        subscriber_id=subscriber,
        node_id=node if subscriber is not None else None,
        epoch=epoch,
        state=state,
    )


async def test_assign_then_list_by_group_and_node(backend: Backend) -> None:
    store = backend.subscriptions
    assert await store.list() == []
    await store.apply(
        [
            assign(ORDERS, "s1", 1),
            assign(LOG, "s2", 4, node="n2"),
            assign(STREAM, "s1", 1, group="a"),
            assign(PART, "s3", 2, group="a", node="n2"),
        ]
    )
    everything = await store.list()
    assert everything == [
        holding(PART, "s3", 2, group="a", node="n2"),
        holding(STREAM, "s1", 1, group="a"),
        holding(ORDERS, "s1", 1),
        holding(LOG, "s2", 4, node="n2"),
    ]  # by group, then source key (the JSON text with sorted keys)
    assert await store.list(group="g") == everything[2:]
    assert await store.list(node_id="n2") == [everything[0], everything[3]]
    assert await store.list(group="a", node_id="n1") == [everything[1]]


async def test_revoke_release_and_reassign(backend: Backend) -> None:
    store = backend.subscriptions
    await store.apply([assign(ORDERS, "s1", 1)])
    await store.apply([Revoke(group="g", source=ORDERS)])
    assert await store.list() == [holding(ORDERS, "s1", 1, HoldingState.REVOKING)]
    await store.apply([Revoke(group="g", source=ORDERS)])  # already revoking: no change
    await store.apply([Release(group="g", source=ORDERS, subscriber_id="s2")])  # not its holder
    assert await store.list() == [holding(ORDERS, "s1", 1, HoldingState.REVOKING)]
    await store.apply([Release(group="g", source=ORDERS, subscriber_id="s1")])
    assert await store.list() == [holding(ORDERS, None, 1, HoldingState.RELEASED)]
    await store.apply(
        [Revoke(group="g", source=ORDERS), Release(group="g", source=LOG, subscriber_id="s1")]
    )  # nothing to revoke or release: no change, no record made
    assert await store.list() == [holding(ORDERS, None, 1, HoldingState.RELEASED)]
    await store.apply([assign(ORDERS, "s2", 2, node="n2")])
    assert await store.list() == [holding(ORDERS, "s2", 2, node="n2")]


async def test_release_of_an_assigned_source_by_its_holder(backend: Backend) -> None:
    store = backend.subscriptions
    await store.apply([assign(ORDERS, "s1", 3)])
    await store.apply([Release(group="g", source=ORDERS, subscriber_id="s1", epoch=2)])
    assert await store.list() == [holding(ORDERS, "s1", 3)]  # a late release of epoch 2
    await store.apply([Release(group="g", source=ORDERS, subscriber_id="s1", epoch=3)])
    assert await store.list() == [holding(ORDERS, None, 3, HoldingState.RELEASED)]
    await store.apply([assign(ORDERS, "s1", 4)])
    await store.apply([Release(group="g", source=ORDERS, subscriber_id="s1")])  # any epoch
    assert await store.list() == [holding(ORDERS, None, 4, HoldingState.RELEASED)]


async def test_an_assign_must_raise_the_epoch_and_a_conflict_changes_nothing(
    backend: Backend,
) -> None:
    store = backend.subscriptions
    await store.apply([assign(ORDERS, "s1", 2), assign(LOG, "s1", 1)])
    before = await store.list()
    for epoch in (1, 2):
        with pytest.raises(ConflictError):
            await store.apply(
                [
                    Revoke(group="g", source=LOG),
                    assign(STREAM, "s9", 1),
                    assign(ORDERS, "s2", epoch),
                ]
            )
        assert await store.list() == before
    await store.apply([Release(group="g", source=ORDERS, subscriber_id="s1")])
    with pytest.raises(ConflictError):
        await store.apply([assign(ORDERS, "s2", 2)])  # released keeps its epoch
    await store.apply([assign(ORDERS, "s2", 7)])
    assert (await store.list(group="g"))[0] == holding(ORDERS, "s2", 7)


async def test_concurrent_assigns_of_one_epoch_one_wins(backend: Backend) -> None:
    store = backend.subscriptions
    for epoch in range(1, 11):
        results = await asyncio.gather(
            store.apply([assign(ORDERS, "s1", epoch)]),
            store.apply([assign(ORDERS, "s2", epoch)]),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1 and isinstance(errors[0], ConflictError)
        winner = "s1" if results[0] is None else "s2"
        assert await store.list() == [holding(ORDERS, winner, epoch)]


async def test_remove_forgets_the_record(backend: Backend) -> None:
    store = backend.subscriptions
    await store.apply([assign(ORDERS, "s1", 5), assign(LOG, "s1", 1)])
    await store.apply([Remove(group="g", source=ORDERS), Remove(group="g", source=STREAM)])
    assert await store.list() == [holding(LOG, "s1", 1)]


@pytest.mark.parametrize(
    "changes",
    [
        [assign(ORDERS, "s1", 1), Revoke(group="g", source=ORDERS)],
        [assign(ORDERS, "s1", 0)],
        [assign(ORDERS, "s1", True)],
        [assign(ORDERS, "s1", None)],  # type: ignore[arg-type]
        [assign(ORDERS, "", 1)],
        [assign(ORDERS, "s1", 1, group="")],
        [assign(ORDERS, "s1", 1, node="")],
        [Release(group="g", source=ORDERS, subscriber_id="")],
        [Release(group="g", source=ORDERS, subscriber_id="s1", epoch=0)],
        [assign(ORDERS, "s1", 1, dead_after=timedelta(-1))],
        [Release(group="g", source=ORDERS, subscriber_id="s1", holder_dead_after=5)],  # type: ignore[arg-type]
        [Revoke(group="g", source="orders")],  # type: ignore[arg-type]
        ["assign"],
    ],
)
async def test_bad_changes_are_refused_and_change_nothing(
    backend: Backend, changes: list[SubscriptionChange]
) -> None:
    store = backend.subscriptions
    await store.apply([assign(LOG, "s1", 1)])
    with pytest.raises(InvalidInputError):
        await store.apply([Revoke(group="g", source=LOG), *changes])
    assert await store.list() == [holding(LOG, "s1", 1)]


async def test_bad_identifiers_are_identifier_errors(backend: Backend) -> None:
    with pytest.raises(InvalidIdentifierError):
        await backend.subscriptions.apply([Revoke(group="g", source="orders")])  # type: ignore[arg-type]


MINUTE = timedelta(minutes=1)
AGE = timedelta(milliseconds=20)


async def wait_dead(backend: Backend, id: str, age: timedelta) -> None:
    """Wait (up to 10 s) until ``id`` of group g has no record last seen within ``age``."""
    deadline = time.monotonic() + 10
    while any(r.id == id for r in await backend.subscribers.list(group="g", max_age=age)):
        assert time.monotonic() < deadline, f"{id} still live"
        await asyncio.sleep(0.005)


async def test_a_takeover_from_a_holder_live_again_revokes_it_instead(backend: Backend) -> None:
    store = backend.subscriptions
    await store.apply([assign(ORDERS, "s1", 1), assign(STREAM, "s1", 4)])
    # s1 was judged dead by the coordinator, then heartbeated before its changes landed
    await backend.subscribers.heartbeat("g", "s1", "n1", [ORDERS, STREAM])
    await store.apply(
        [
            assign(ORDERS, "s2", 2, node="n2", dead_after=MINUTE),
            Release(
                group="g", source=STREAM, subscriber_id="s1", epoch=4, holder_dead_after=MINUTE
            ),
            assign(LOG, "s2", 1, node="n2"),  # the rest of the batch applies
        ]
    )
    assert await store.list() == [
        holding(STREAM, "s1", 4, HoldingState.REVOKING),
        holding(ORDERS, "s1", 1, HoldingState.REVOKING),
        holding(LOG, "s2", 1, node="n2"),
    ]
    # it releases as after any revoke; then the source goes on to its new holder
    await store.apply([Release(group="g", source=ORDERS, subscriber_id="s1", epoch=1)])
    await store.apply([assign(ORDERS, "s2", 2, node="n2", dead_after=MINUTE)])
    assert (await store.list(group="g"))[1] == holding(ORDERS, "s2", 2, node="n2")


async def test_a_takeover_from_a_still_dead_holder_goes_through(backend: Backend) -> None:
    store = backend.subscriptions
    sources: tuple[EventSourceIdentifier, ...] = (ORDERS, LOG, STREAM, PART)
    await store.apply([assign(source, f"s{n}", 3) for n, source in enumerate(sources)])
    await backend.subscribers.heartbeat("g", "s0", "n1", [ORDERS])  # then silent
    await backend.subscribers.heartbeat("g", "s1", "n2", [LOG])  # live, but on another node
    await backend.subscribers.heartbeat("g", "s2", "n1", [STREAM])
    await backend.subscribers.remove("g", "s2")  # purged
    # s3 never had a record
    await wait_dead(backend, "s0", AGE)
    await store.apply(
        [
            assign(ORDERS, "t", 4, dead_after=AGE),
            assign(LOG, "t", 4, dead_after=MINUTE),
            assign(STREAM, "t", 4, dead_after=MINUTE),
            Release(group="g", source=PART, subscriber_id="s3", epoch=3, holder_dead_after=MINUTE),
        ]
    )
    assert await store.list() == [
        holding(PART, None, 3, HoldingState.RELEASED),
        holding(STREAM, "t", 4),
        holding(ORDERS, "t", 4),
        holding(LOG, "t", 4),
    ]
    # the check never makes a dead holder look live
    live = await backend.subscribers.list(max_age=MINUTE)
    assert sorted(r.id for r in live) == ["s0", "s1"]


async def test_a_stale_takeover_is_still_a_conflict(backend: Backend) -> None:
    store = backend.subscriptions
    await store.apply([assign(ORDERS, "s1", 5)])
    await backend.subscribers.heartbeat("g", "s1", "n1", [ORDERS])
    before = await store.list()
    with pytest.raises(ConflictError):
        await store.apply([assign(ORDERS, "s2", 5, dead_after=MINUTE)])
    assert await store.list() == before

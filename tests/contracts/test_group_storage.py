"""The GroupStorage contract (list, retire and reset whole groups), on every backend."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from eventmill import (
    CategoryPartitionIdentifier,
    ConflictError,
    EventStore,
    InvalidIdentifierError,
    NewEvent,
    StaleEpochError,
    StreamIdentifier,
)
from eventmill.backends.base import Assign, Backend, HoldingState, ParkedStream, Release, Revoke
from eventmill.errors import GroupInUseError

P0 = CategoryPartitionIdentifier("orders", 0, 2)
P1 = CategoryPartitionIdentifier("orders", 1, 2)
STREAM = StreamIdentifier("orders", "o-1")
MINUTE = timedelta(minutes=1)


async def held_group(backend: Backend, group: str = "g") -> None:
    """P0 assigned to s1 at epoch 3 with a checkpoint; P1 released at epoch 2."""
    await backend.subscribers.register(group, "s1", "n1", [P0, P1])
    await backend.subscriptions.apply(
        [
            Assign(group=group, source=P0, subscriber_id="s1", node_id="n1", epoch=3),
            Assign(group=group, source=P1, subscriber_id="s1", node_id="n1", epoch=2),
        ]
    )
    await backend.subscriptions.apply([Revoke(group=group, source=P1)])
    holdings = await backend.subscriptions.list(group=group)
    await backend.subscriptions.apply(
        [Release(group=group, source=P1, subscriber_id="s1", epoch=holdings[1].epoch)]
    )
    await backend.checkpoints.save(group, P0, 7, expected_version=None, epoch=3)


async def test_overview_counts_records_holdings_and_checkpoints(backend: Backend) -> None:
    await held_group(backend)
    await backend.checkpoints.save("other", STREAM, 1, expected_version=None)
    summaries = await backend.groups.overview(max_age=MINUTE)
    assert [(s.group, s.subscribers, s.live, s.holdings, s.checkpoints) for s in summaries] == [
        ("g", 1, 1, 2, 1),
        ("other", 0, 0, 0, 1),
    ]
    dead = await backend.groups.overview(max_age=timedelta(0))
    assert [s.live for s in dead] == [0, 0]


async def test_retire_refuses_a_live_group_and_deletes_nothing(backend: Backend) -> None:
    await held_group(backend)
    with pytest.raises(GroupInUseError):
        await backend.groups.retire("g", max_age=MINUTE)
    assert len(await backend.subscriptions.list(group="g")) == 2
    assert len(await backend.checkpoints.list("g")) == 1
    assert len(await backend.subscribers.list(group="g")) == 1


async def test_retire_deletes_everything_of_the_group_only(backend: Backend) -> None:
    await held_group(backend)
    await held_group(backend, "kept")
    await asyncio.sleep(0.01)  # the records must be older than the max age below
    gone = await backend.groups.retire("g", max_age=timedelta(microseconds=1))
    assert (gone.subscribers, gone.live, gone.holdings, gone.checkpoints) == (1, 0, 2, 1)
    assert await backend.subscriptions.list(group="g") == []
    assert await backend.checkpoints.list("g") == []
    assert await backend.subscribers.list(group="g") == []
    assert [s.group for s in await backend.groups.overview(max_age=MINUTE)] == ["kept"]
    again = await backend.groups.retire("g", max_age=MINUTE)
    assert (again.subscribers, again.holdings, again.checkpoints) == (0, 0, 0)
    with pytest.raises(InvalidIdentifierError):
        await backend.groups.retire("", max_age=MINUTE)


async def test_reset_fences_revokes_and_marks_every_source(backend: Backend) -> None:
    await held_group(backend)
    moved = await backend.groups.reset("g", after=None)
    assert [(c.source, c.after, c.epoch, c.reset_pending) for c in moved] == [
        (P0, None, 4, True),
        (P1, None, 3, True),
    ]
    holdings = {h.source: h for h in await backend.subscriptions.list(group="g")}
    assert (holdings[P0].state, holdings[P0].epoch) == (HoldingState.REVOKING, 4)
    assert (holdings[P1].state, holdings[P1].epoch) == (HoldingState.RELEASED, 3)
    # The holder under epoch 3 can no longer save.
    with pytest.raises(StaleEpochError):
        await backend.checkpoints.save("g", P0, 9, expected_version=moved[0].version, epoch=3)
    # The next holder (a newer epoch) saves over the reset and clears the mark.
    await backend.checkpoints.fence("g", P0, 5)
    fenced = await backend.checkpoints.get("g", P0)
    assert fenced is not None and fenced.after is None and fenced.reset_pending
    saved = await backend.checkpoints.save("g", P0, 2, expected_version=fenced.version, epoch=5)
    assert not saved.reset_pending
    # An Assign at an epoch the reset took is refused.
    with pytest.raises(ConflictError):
        await backend.subscriptions.apply(
            [Assign(group="g", source=P1, subscriber_id="s1", node_id="n1", epoch=3)]
        )


async def test_reset_to_a_sequence_number_of_chosen_sources(
    backend: Backend, store: EventStore
) -> None:
    stored = []
    for number in range(4):
        stored += await store.stream(category="orders", stream=f"o-{number % 2}").publish(
            [NewEvent(name="placed", payload={"n": number})]
        )
    await held_group(backend)
    third = stored[2].sequence_number
    moved = await backend.groups.reset("g", after=third, sources=[P1, STREAM])
    assert len(moved) == 2
    by_source = {c.source: c for c in moved}
    o1_positions = [e.position for e in stored if e.stream == "o-1" and e.sequence_number <= third]
    assert by_source[STREAM].after == (o1_positions[-1] if o1_positions else None)
    assert by_source[P1].after == third
    untouched = await backend.checkpoints.get("g", P0)
    assert untouched is not None and untouched.after == 7 and not untouched.reset_pending
    assert await backend.groups.reset("nothing-here", after=None) == []


async def test_sequence_before_a_time(backend: Backend, store: EventStore) -> None:
    assert await backend.groups.sequence_before(datetime.now(UTC)) is None
    first = await store.stream(category="c", stream="s").publish([NewEvent(name="a")])
    await asyncio.sleep(0.01)
    between = datetime.now(UTC)
    await asyncio.sleep(0.01)
    second = await store.stream(category="c", stream="s").publish([NewEvent(name="b")])
    assert await backend.groups.sequence_before(between) == second[0].sequence_number - 1
    assert second[0].sequence_number - 1 >= first[0].sequence_number
    later = datetime.now(UTC) + timedelta(hours=1)
    assert await backend.groups.sequence_before(later) == second[0].sequence_number


def parked(
    group: str, source: CategoryPartitionIdentifier, stream: str, first: int
) -> ParkedStream:
    """A record whose first held event has sequence number ``first``."""
    when = datetime(2026, 1, 1, tzinfo=UTC)
    return ParkedStream(
        group=group,
        source=source,
        stream=StreamIdentifier("orders", stream),
        sequence_number=first,
        position=0,
        event_name="order-placed",
        held=2,
        last_held=first + 10,
        error_type="KeyError",
        error_message="'total'",
        traceback="",
        attempts=3,
        first_failed_at=when,
        last_failed_at=when,
    )


async def test_reset_deletes_the_parked_streams_its_replay_reaches(backend: Backend) -> None:
    await held_group(backend)
    before = parked("g", P0, "a", 6)  # held from before the new place: stays held
    reached = parked("g", P0, "b", 7)
    elsewhere = parked("g", P1, "c", 9)
    other_group = parked("other", P0, "b", 7)
    for record in (before, reached, elsewhere, other_group):
        await backend.parked.park(record)
    await backend.groups.reset("g", after=6, sources=[P0])
    assert await backend.parked.list() == [before, elsewhere, other_group]
    await backend.groups.reset("g", after=None)
    assert await backend.parked.list() == [other_group]

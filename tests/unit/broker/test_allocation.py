"""Allocation: examples of each rule, and hypothesis histories checking every invariant."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from eventmill.backends.base import (
    Assign,
    HoldingState,
    Release,
    Remove,
    Revoke,
    SourceHolding,
    SubscriberRecord,
    SubscriptionChange,
)
from eventmill.broker.allocation import GroupAllocation, allocate, allocate_group
from eventmill.events import EventSourceIdentifier, StreamIdentifier

T0 = datetime(2025, 1, 1, tzinfo=UTC)
GROUP = "g"


def streams(count: int, start: int = 0) -> tuple[EventSourceIdentifier, ...]:
    return tuple(StreamIdentifier("c", f"s{number:03}") for number in range(start, start + count))


def subscriber(
    number: int,
    requests: tuple[EventSourceIdentifier, ...],
    *,
    group: str = GROUP,
    node: str = "n1",
) -> SubscriberRecord:
    return SubscriberRecord(
        group=group,
        id=f"sub-{number:03}",
        node_id=node,
        subscription_requests=requests,
        registered_at=T0 + timedelta(seconds=number),
        last_seen=T0 + timedelta(seconds=number),
    )


@dataclass
class World:
    """Live subscribers and holdings of one group, changed the way the stores would."""

    live: dict[str, SubscriberRecord] = field(default_factory=dict)
    holdings: dict[EventSourceIdentifier, SourceHolding] = field(default_factory=dict)

    def allocate(self) -> GroupAllocation:
        return allocate_group(GROUP, list(self.live.values()), list(self.holdings.values()))

    def apply(self, changes: Iterable[SubscriptionChange]) -> None:
        for change in changes:
            old = self.holdings.get(change.source)
            if isinstance(change, Assign):
                assert old is None or change.epoch > old.epoch
                self.holdings[change.source] = SourceHolding(
                    group=change.group,
                    source=change.source,
                    subscriber_id=change.subscriber_id,
                    node_id=change.node_id,
                    epoch=change.epoch,
                    state=HoldingState.ASSIGNED,
                )
            elif isinstance(change, Revoke):
                if old is not None and old.state is HoldingState.ASSIGNED:
                    self.holdings[change.source] = replace(old, state=HoldingState.REVOKING)
            elif isinstance(change, Release):
                if (
                    old is not None
                    and old.subscriber_id == change.subscriber_id
                    and change.epoch in (None, old.epoch)
                ):
                    self.release(old)
            else:
                assert isinstance(change, Remove)
                self.holdings.pop(change.source, None)

    def release(self, holding: SourceHolding) -> None:
        self.holdings[holding.source] = replace(
            holding, subscriber_id=None, node_id=None, state=HoldingState.RELEASED
        )

    def observe(self, subscriber_id: str) -> None:
        """What the subscriber's observer does: release what is being revoked."""
        for holding in list(self.holdings.values()):
            if holding.subscriber_id == subscriber_id and holding.state is HoldingState.REVOKING:
                self.release(holding)

    def leave(self, subscriber_id: str) -> None:
        """A graceful stop: release everything, then unregister."""
        for holding in list(self.holdings.values()):
            if holding.subscriber_id == subscriber_id:
                self.release(holding)
        del self.live[subscriber_id]

    def settle(self) -> GroupAllocation:
        """Coordinator rounds and observers until nothing is left to do."""
        for _ in range(4):
            allocation = self.allocate()
            if allocation.settled:
                return allocation
            self.apply(allocation.changes)
            for subscriber_id in list(self.live):
                self.observe(subscriber_id)
        raise AssertionError("allocation did not settle within 4 rounds")

    def held_by(self) -> dict[str, list[EventSourceIdentifier]]:
        result: dict[str, list[EventSourceIdentifier]] = {sid: [] for sid in self.live}
        for holding in self.holdings.values():
            if holding.subscriber_id is not None and holding.state is HoldingState.ASSIGNED:
                result[holding.subscriber_id].append(holding.source)
        return result


def revoked(allocation: GroupAllocation) -> list[EventSourceIdentifier]:
    return [change.source for change in allocation.changes if isinstance(change, Revoke)]


def test_a_fifth_subscriber_joining_four_with_40_sources_moves_exactly_8() -> None:
    world = World()
    sources = streams(40)
    for number in range(4):
        world.live[f"sub-{number:03}"] = subscriber(number, sources)
    world.settle()
    assert sorted(len(held) for held in world.held_by().values()) == [10, 10, 10, 10]
    before = {h.source: h.subscriber_id for h in world.holdings.values()}

    world.live["sub-004"] = subscriber(4, sources)
    first = world.allocate()
    assert len(revoked(first)) == 8
    assert not [c for c in first.changes if isinstance(c, Assign)]  # all 40 are held
    world.apply(first.changes)
    for subscriber_id in world.live:
        world.observe(subscriber_id)
    second = world.allocate()
    assigned = [c for c in second.changes if isinstance(c, Assign)]
    assert len(assigned) == 8 and {c.subscriber_id for c in assigned} == {"sub-004"}
    assert not revoked(second)
    world.apply(second.changes)
    assert world.allocate().settled
    assert sorted(len(held) for held in world.held_by().values()) == [8, 8, 8, 8, 8]
    after = {h.source: h.subscriber_id for h in world.holdings.values()}
    assert sum(before[s] != after[s] for s in sources) == 8


def test_one_leaving_moves_only_its_own_sources() -> None:
    world = World()
    sources = streams(40)
    for number in range(5):
        world.live[f"sub-{number:03}"] = subscriber(number, sources)
    world.settle()
    before = {h.source: h.subscriber_id for h in world.holdings.values()}
    world.leave("sub-002")
    allocation = world.allocate()
    assert not revoked(allocation)
    moved = {c.source for c in allocation.changes if isinstance(c, Assign)}
    assert moved == {s for s, sid in before.items() if sid == "sub-002"}
    world.apply(allocation.changes)
    assert world.allocate().settled
    assert sorted(len(held) for held in world.held_by().values()) == [10, 10, 10, 10]


def test_a_dead_holders_sources_are_assigned_at_once_under_the_next_epoch() -> None:
    world = World()
    sources = streams(6)
    world.live["sub-000"] = subscriber(0, sources)
    world.live["sub-001"] = subscriber(1, sources)
    world.settle()
    dead = {h.source: h.epoch for h in world.holdings.values() if h.subscriber_id == "sub-001"}
    del world.live["sub-001"]  # no release: it died
    allocation = world.allocate()
    assigned = {c.source: c for c in allocation.changes if isinstance(c, Assign)}
    assert set(assigned) == set(dead)
    assert all(c.subscriber_id == "sub-000" and c.node_id == "n1" for c in assigned.values())
    assert all(assigned[s].epoch == dead[s] + 1 for s in dead)


def test_a_holder_back_on_another_node_counts_as_dead() -> None:
    world = World()
    sources = streams(2)
    world.live["sub-000"] = subscriber(0, sources, node="n1")
    world.settle()
    world.live["sub-000"] = subscriber(0, sources, node="n2")
    allocation = world.allocate()
    assert all(isinstance(c, Assign) and c.node_id == "n2" for c in allocation.changes)
    assert len(allocation.changes) == 2


def test_a_source_being_revoked_waits_for_its_release_unless_the_holder_died() -> None:
    world = World()
    sources = streams(2)
    world.live["sub-000"] = subscriber(0, sources)
    world.settle()
    world.live["sub-001"] = subscriber(1, sources)
    world.apply(world.allocate().changes)
    waiting = world.allocate()
    assert waiting.changes == () and not waiting.settled
    del world.live["sub-000"]
    allocation = world.allocate()
    assert [type(c) for c in allocation.changes] == [Assign, Assign]
    assert {c.subscriber_id for c in allocation.changes if isinstance(c, Assign)} == {"sub-001"}


def test_unrequested_sources_are_revoked_from_the_live_and_released_from_the_dead() -> None:
    world = World()
    world.live["sub-000"] = subscriber(0, streams(4))
    world.live["sub-001"] = subscriber(1, streams(4))
    world.settle()
    dead_holdings = [h.source for h in world.holdings.values() if h.subscriber_id == "sub-001"]
    del world.live["sub-001"]
    world.live["sub-000"] = subscriber(0, ())
    allocation = world.allocate()
    assert allocation.requests == () and allocation.desired == {}
    revokes = {c.source for c in allocation.changes if isinstance(c, Revoke)}
    releases = {c.source for c in allocation.changes if isinstance(c, Release)}
    assert releases == set(dead_holdings)
    assert revokes == set(streams(4)) - set(dead_holdings)


def test_rolling_deploy_majority_wins_then_on_a_tie_the_newest() -> None:
    old, new = streams(6), streams(8)
    live = [subscriber(0, old), subscriber(1, old), subscriber(2, new)]
    allocation = allocate_group(GROUP, live, [])
    assert allocation.eligible == ("sub-000", "sub-001")
    assert set(allocation.desired.values()) == {"sub-000", "sub-001"}
    live = [subscriber(1, old), subscriber(2, new), subscriber(0, old)]
    live.append(subscriber(3, new))
    del live[0]  # sub-000 (old) and sub-002, sub-003 (new): new has the majority
    assert allocate_group(GROUP, live, []).eligible == ("sub-002", "sub-003")
    tie = [subscriber(0, old), subscriber(3, old), subscriber(1, new), subscriber(2, new)]
    assert allocate_group(GROUP, tie, []).requests == old  # sub-003 is the newest
    tie = [subscriber(0, old), subscriber(1, old), subscriber(2, new), subscriber(3, new)]
    assert allocate_group(GROUP, tie, []).requests == new


def test_requests_compare_as_sets() -> None:
    sources = streams(3)
    live = [subscriber(0, sources), subscriber(1, tuple(reversed(sources)) + sources[:1])]
    assert allocate_group(GROUP, live, []).eligible == ("sub-000", "sub-001")


def test_allocate_splits_groups_and_covers_groups_left_with_holdings_only() -> None:
    live = [subscriber(0, streams(3), group="b"), subscriber(1, streams(2), group="a")]
    orphan = SourceHolding(
        group="c",
        source=streams(1)[0],
        subscriber_id="gone",
        node_id="n9",
        epoch=3,
        state=HoldingState.ASSIGNED,
    )
    result = allocate(live, [orphan])
    assert [a.group for a in result] == ["a", "b", "c"]
    assert [len(a.desired) for a in result] == [2, 3, 0]
    assert result[2].changes == (
        Release(group="c", source=orphan.source, subscriber_id="gone", epoch=3),
    )


def test_no_subscribers_and_no_holdings_is_settled() -> None:
    allocation = allocate_group(GROUP, [], [])
    assert allocation.settled and allocation.changes == () and allocation.eligible == ()


# ---- properties over random histories ----

SOURCE_POOL = streams(14)

requests_strategy = st.lists(st.sampled_from(SOURCE_POOL), max_size=14).map(tuple)
step_strategy = st.one_of(
    st.tuples(st.just("join"), st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.just("leave"), st.integers(0, 30), st.just(0)),
    st.tuples(st.just("die"), st.integers(0, 30), st.just(0)),
    st.tuples(st.just("observe"), st.integers(0, 30), st.just(0)),
    st.tuples(st.just("round"), st.just(0), st.just(0)),
)


def lower_bound_of_moves(world: World, allocation: GroupAllocation) -> int:
    """The fewest sources any balanced allocation must take from eligible holders."""
    eligible = set(allocation.eligible)
    kept = Counter(
        h.subscriber_id
        for h in world.holdings.values()
        if h.subscriber_id in eligible
        and h.state is HoldingState.ASSIGNED
        and world.live[h.subscriber_id].node_id == h.node_id
        and h.source in allocation.desired
    )
    if not eligible:
        return 0
    base, extra = divmod(len(allocation.desired), len(eligible))
    most_kept = sum(min(k, base) for k in kept.values()) + min(
        extra, sum(k > base for k in kept.values())
    )
    return sum(kept.values()) - most_kept


def check_round(world: World, allocation: GroupAllocation, shuffle: random.Random) -> None:
    live = list(world.live.values())
    holdings = list(world.holdings.values())
    # Deterministic: input order does not matter.
    shuffle.shuffle(live)
    shuffle.shuffle(holdings)
    again = allocate_group(GROUP, live, holdings)
    assert again == allocation
    assert list(again.desired.items()) == list(allocation.desired.items())
    # The group's requests come from live subscribers, and only those requesting
    # exactly them are eligible.
    eligible = set(allocation.eligible)
    requested = set(allocation.requests)
    assert all(set(world.live[sid].subscription_requests) == requested for sid in eligible)
    if world.live:
        assert eligible
    # Every requested source has exactly one desired holder, an eligible one; balanced.
    assert list(allocation.desired) == list(allocation.requests)
    assert set(allocation.desired.values()) <= eligible
    counts = Counter(allocation.desired.values())
    if eligible:
        loads = [counts[sid] for sid in eligible]
        assert max(loads) - min(loads) <= 1

    # Revoke-then-assign: assignments only of sources no live subscriber holds, to the
    # desired (so eligible) holder on its own node, under a greater epoch.
    def live_holder(source: EventSourceIdentifier) -> str | None:
        holding = world.holdings.get(source)
        if holding is None or holding.subscriber_id not in world.live:
            return None
        return (
            holding.subscriber_id
            if world.live[holding.subscriber_id].node_id == (holding.node_id)
            else None
        )

    sources = [change.source for change in allocation.changes]
    assert len(sources) == len(set(sources))
    for change in allocation.changes:
        holding = world.holdings.get(change.source)
        if isinstance(change, Assign):
            assert live_holder(change.source) is None
            assert allocation.desired[change.source] == change.subscriber_id
            assert change.node_id == world.live[change.subscriber_id].node_id
            assert change.epoch == (1 if holding is None else holding.epoch + 1)
        elif isinstance(change, Revoke):
            assert holding is not None and holding.state is HoldingState.ASSIGNED
            assert live_holder(change.source) is not None
            assert allocation.desired.get(change.source) != holding.subscriber_id
        else:
            assert isinstance(change, Release)
            assert live_holder(change.source) is None
            assert change.source not in allocation.desired
    # Sticky: the sources taken from eligible holders are exactly as few as possible.
    taken = [
        source
        for source in revoked(allocation)
        if source in allocation.desired and live_holder(source) in eligible
    ]
    assert len(taken) == lower_bound_of_moves(world, allocation)


@settings(max_examples=300, deadline=None)
@given(
    variants=st.lists(requests_strategy, min_size=3, max_size=3),
    steps=st.lists(step_strategy, max_size=40),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_invariant_holds_over_random_histories(
    variants: list[tuple[EventSourceIdentifier, ...]],
    steps: list[tuple[str, int, int]],
    seed: int,
) -> None:
    world = World()
    shuffle = random.Random(seed)
    joined = 0
    for action, first, second in steps:
        members = sorted(world.live)
        if action == "join":
            record = subscriber(joined, variants[first], node=f"n{second}")
            world.live[record.id] = record
            joined += 1
        elif action == "round":
            allocation = world.allocate()
            check_round(world, allocation, shuffle)
            world.apply(allocation.changes)
        elif members:
            member = members[first % len(members)]
            if action == "leave":
                world.leave(member)
            elif action == "die":
                del world.live[member]
            else:
                world.observe(member)
    # Whatever happened, a few rounds settle on a balanced allocation that is held.
    final = world.settle()
    check_round(world, final, shuffle)
    held = {
        h.source: h.subscriber_id
        for h in world.holdings.values()
        if h.state is HoldingState.ASSIGNED
    }
    assert held == dict(final.desired)


@settings(max_examples=100, deadline=None)
@given(
    holders=st.integers(1, 6),
    sources=st.integers(0, 40),
    joining=st.integers(1, 3),
)
def test_joining_moves_exactly_the_lower_bound_and_leaving_only_the_leavers(
    holders: int, sources: int, joining: int
) -> None:
    world = World()
    targets = streams(sources)
    for number in range(holders):
        world.live[f"sub-{number:03}"] = subscriber(number, targets)
    world.settle()
    for number in range(holders, holders + joining):
        world.live[f"sub-{number:03}"] = subscriber(number, targets)
    total = holders + joining
    loads = sorted((len(v) for v in world.held_by().values() if v), reverse=True)
    base, extra = divmod(sources, total)
    expected = sum(max(load - (base + (i < extra)), 0) for i, load in enumerate(loads))
    assert len(revoked(world.allocate())) == expected
    before = {h.source: h.subscriber_id for h in world.holdings.values()}
    world.settle()
    after_join = {h.source: h.subscriber_id for h in world.holdings.values()}
    assert sum(before[s] != after_join[s] for s in targets) == expected
    leaver = "sub-000"
    owned = set(world.held_by()[leaver])
    world.leave(leaver)
    world.settle()
    after_leave = {h.source: h.subscriber_id for h in world.holdings.values()}
    assert {s for s in after_leave if after_leave[s] != after_join[s]} == owned


@st.composite
def arbitrary_worlds(draw: st.DrawFn) -> World:
    """Any state the stores can be in, not only states allocation leads to."""
    world = World()
    variants = draw(st.lists(requests_strategy, min_size=1, max_size=3))
    for number in range(draw(st.integers(0, 7))):
        record = subscriber(
            draw(st.integers(0, 20)) * 10 + number,
            draw(st.sampled_from(variants)),
            node=draw(st.sampled_from(["n1", "n2"])),
        )
        world.live[record.id] = record
    candidates = [*sorted(world.live), "sub-dead"]
    for source in draw(st.lists(st.sampled_from(SOURCE_POOL), unique=True)):
        state = draw(st.sampled_from(HoldingState))
        holder = None if state is HoldingState.RELEASED else draw(st.sampled_from(candidates))
        node = None if holder is None else draw(st.sampled_from(["n1", "n2"]))
        world.holdings[source] = SourceHolding(
            group=GROUP,
            source=source,
            subscriber_id=holder,
            node_id=node,
            epoch=draw(st.integers(1, 5)),
            state=state,
        )
    return world


@settings(max_examples=500, deadline=None)
@given(world=arbitrary_worlds(), seed=st.integers(0, 2**32 - 1))
def test_every_invariant_holds_from_any_state(world: World, seed: int) -> None:
    check_round(world, world.allocate(), random.Random(seed))
    final = world.settle()
    check_round(world, final, random.Random(seed))
    assert {
        h.source: h.subscriber_id
        for h in world.holdings.values()
        if h.state is HoldingState.ASSIGNED
    } == dict(final.desired)

"""Allocation: which live subscriber of a group should hold which source, and what to
change now to get there. Pure: plain values in, decisions out; no I/O, no clock.

The coordinator calls ``allocate(subscribers, holdings)`` with the live subscriber
records (``backend.subscribers.list(max_age=...)``) and every current holding
(``backend.subscriptions.list()``), fences each ``Assign``'s checkpoint at its epoch
(``backend.checkpoints.fence``), then applies the changes in one
``backend.subscriptions.apply`` (a ConflictError there means the holdings changed
under it: read them again next round). Observers release what is REVOKING with
``Release(..., epoch=...)``; the next round assigns it to its new holder.

Rules, per group:

- **The group's requests.** Instances of a group may disagree on what they request
  (during a rolling deploy). The requests (as a set) of the most live subscribers win;
  on a tie, those of the most recently registered subscriber (ties of time: the
  greatest id), so a newer version takes over once it has half the instances.
- **Eligible** subscribers are the live ones with exactly those requests. Only they
  are given sources; every requested source is given to exactly one of them.
- **Balanced.** With ``m`` sources and ``n`` eligible subscribers each gets
  ``m // n`` sources, and ``m % n`` of them one more: those holding the most now (ties:
  the earliest registered, then the smallest id).
- **Sticky.** Each eligible subscriber keeps what it holds (ASSIGNED) up to its quota,
  its sources in source-key order; only the excess moves. Since the extra places go
  to those holding the most, no balanced allocation moves fewer sources: four
  subscribers with 40 sources and a fifth joining move exactly 8; one leaving moves
  only its own.
- **Deterministic.** Everything is ordered by source key, registration time and id;
  nothing depends on input order, dict order or ``hash()``.

Changes (revoke-then-assign, guarantee 5 in docs/guarantees.md):

- a source held (ASSIGNED) by a live subscriber that should not keep it: ``Revoke``;
  it is given to its new holder in a later round, once released;
- a source being revoked from a live subscriber (REVOKING): nothing until released;
- a requested source that is released, never held, or held by a subscriber that is
  not live (no live record with that id on that node): ``Assign`` to its desired
  holder at once, under the next epoch;
- a source nobody requests any more, held by a subscriber that is not live:
  ``Release`` (its epoch is kept).

An Assign or Release taking a source from a holder that is not live carries
``holder_dead_after=max_age`` (the age the live records were listed with, when given):
the storage then applies it only if that holder is still dead, and revokes the source
from it otherwise (it heartbeated after the records were listed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from eventmill.backends.base import (
    Assign,
    HoldingState,
    Release,
    Revoke,
    SourceHolding,
    SubscriberRecord,
    SubscriptionChange,
)
from eventmill.events import EventSourceIdentifier, source_key


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupAllocation:
    """The decision for one group.

    ``requests`` are the group's current requests (in source-key order), ``eligible``
    the ids of the subscribers that may hold them (registration order), ``desired`` the
    holder each requested source should end up with (source-key order), and ``changes``
    what to apply now. ``settled`` is true when every requested source is ASSIGNED to
    its desired holder and nothing else is held: nothing left to do.
    """

    group: str
    requests: tuple[EventSourceIdentifier, ...]
    eligible: tuple[str, ...]
    desired: Mapping[EventSourceIdentifier, str]
    changes: tuple[SubscriptionChange, ...]
    settled: bool


def allocate(
    subscribers: Sequence[SubscriberRecord],
    holdings: Sequence[SourceHolding],
    *,
    max_age: timedelta | None = None,
) -> list[GroupAllocation]:
    """The allocation of every group that has a live subscriber or a holding, in group
    order. ``subscribers`` are the live records (last seen at most ``max_age`` ago);
    ``holdings`` the current ones."""
    members: dict[str, list[SubscriberRecord]] = {}
    held: dict[str, list[SourceHolding]] = {}
    for record in subscribers:
        members.setdefault(record.group, []).append(record)
    for holding in holdings:
        held.setdefault(holding.group, []).append(holding)
    return [
        allocate_group(group, members.get(group, []), held.get(group, []), max_age=max_age)
        for group in sorted(members.keys() | held.keys())
    ]


def allocate_group(
    group: str,
    subscribers: Sequence[SubscriberRecord],
    holdings: Sequence[SourceHolding],
    *,
    max_age: timedelta | None = None,
) -> GroupAllocation:
    """The allocation of ``group`` given its live subscribers (last seen at most
    ``max_age`` ago) and its holdings (records of other groups are ignored)."""
    live = sorted((r for r in subscribers if r.group == group), key=_registration_order)
    current = [h for h in holdings if h.group == group]
    requests, eligible = _eligible(live)
    keys = {source: source_key(source) for source in requests}
    keys.update((h.source, source_key(h.source)) for h in current if h.source not in keys)
    targets = sorted(requests, key=keys.__getitem__)
    live_nodes = {record.id: record.node_id for record in live}
    eligible_ids = {record.id for record in eligible}
    by_source = {h.source: h for h in current}
    # The live subscriber holding each source (ASSIGNED or REVOKING): a record with
    # that id on that node must be live, else the holder is dead.
    holders = {
        h.source: h.subscriber_id
        for h in current
        if h.subscriber_id is not None and live_nodes.get(h.subscriber_id) == h.node_id
    }
    kept: dict[str, list[EventSourceIdentifier]] = {}
    for source in targets:
        held_by = holders.get(source)
        if (
            held_by is not None
            and held_by in eligible_ids
            and by_source[source].state is HoldingState.ASSIGNED
        ):
            kept.setdefault(held_by, []).append(source)
    desired = _balance(targets, eligible, kept)

    changes: list[SubscriptionChange] = []
    waiting = False
    for source in sorted(keys, key=keys.__getitem__):
        holding = by_source.get(source)
        wanted = desired.get(source)
        held_by = holders.get(source)
        if holding is None or held_by is None:
            # taken from a dead holder: the storage checks it is still dead
            dead_after = None if holding is None or holding.subscriber_id is None else max_age
            if wanted is not None:
                epoch = 1 if holding is None else holding.epoch + 1
                changes.append(
                    Assign(
                        group=group,
                        source=source,
                        subscriber_id=wanted,
                        node_id=live_nodes[wanted],
                        epoch=epoch,
                        holder_dead_after=dead_after,
                    )
                )
            elif holding is not None and holding.subscriber_id is not None:
                changes.append(
                    Release(
                        group=group,
                        source=source,
                        subscriber_id=holding.subscriber_id,
                        epoch=holding.epoch,
                        holder_dead_after=dead_after,
                    )
                )
        elif holding.state is HoldingState.REVOKING:
            waiting = True
        elif wanted != held_by:
            changes.append(Revoke(group=group, source=source))
    return GroupAllocation(
        group=group,
        requests=tuple(targets),
        eligible=tuple(record.id for record in eligible),
        desired=desired,
        changes=tuple(changes),
        settled=not changes and not waiting,
    )


def _registration_order(record: SubscriberRecord) -> tuple[datetime, str]:
    return (record.registered_at, record.id)


def _eligible(
    live: list[SubscriberRecord],
) -> tuple[frozenset[EventSourceIdentifier], list[SubscriberRecord]]:
    """The group's requests and the subscribers (of ``live``, in registration order)
    requesting exactly them: the requests of the most subscribers, then of the newest."""
    request_sets: dict[int, frozenset[EventSourceIdentifier]] = {}
    variants: dict[frozenset[EventSourceIdentifier], list[SubscriberRecord]] = {}
    for record in live:
        # Many records usually share one requests tuple: make its set once.
        requests = request_sets.get(id(record.subscription_requests))
        if requests is None:
            requests = frozenset(record.subscription_requests)
            request_sets[id(record.subscription_requests)] = requests
        variants.setdefault(requests, []).append(record)
    if not variants:
        return frozenset(), []
    # ``live`` is in registration order, so a variant's last record is its newest.
    return max(
        variants.items(),
        key=lambda item: (len(item[1]), item[1][-1].registered_at, item[1][-1].id),
    )


def _balance(
    targets: list[EventSourceIdentifier],
    eligible: list[SubscriberRecord],
    kept: Mapping[str, list[EventSourceIdentifier]],
) -> dict[EventSourceIdentifier, str]:
    """The desired holder of each target (in target order): every eligible subscriber
    keeps its ``kept`` sources (target order) up to its quota; the rest are shared out
    in registration order."""
    if not eligible:
        return {}
    base, extra = divmod(len(targets), len(eligible))
    ranked = sorted(eligible, key=lambda r: (-len(kept.get(r.id, ())), r.registered_at, r.id))
    quotas = {record.id: base + (index < extra) for index, record in enumerate(ranked)}
    owners: dict[EventSourceIdentifier, str] = {}
    for record in eligible:
        for source in kept.get(record.id, [])[: quotas[record.id]]:
            owners[source] = record.id
    free = (source for source in targets if source not in owners)
    for record in eligible:
        missing = quotas[record.id] - min(quotas[record.id], len(kept.get(record.id, ())))
        for _ in range(missing):
            owners[next(free)] = record.id
    return {source: owners[source] for source in targets}

"""One allocation round (the pure function) for 1,000 subscribers and 5,000 sources:
in one group, and spread over 100 groups; from nothing held, and with a subscriber
joining a settled allocation. Medians of several runs."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from benchmarks.common import median, report
from eventmill.backends.base import (
    Assign,
    HoldingState,
    SourceHolding,
    SubscriberRecord,
)
from eventmill.broker.allocation import allocate
from eventmill.events import EventSourceIdentifier, StreamIdentifier

REPEATS = 5
SUBSCRIBERS = 1_000
SOURCES = 5_000
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def membership(groups: int) -> list[SubscriberRecord]:
    """``SUBSCRIBERS`` live records over ``groups`` groups, each group's instances sharing
    one requests tuple (as they do when read from the subscriber state store)."""
    per_group = SOURCES // groups
    records = []
    for group in range(groups):
        requests: tuple[EventSourceIdentifier, ...] = tuple(
            StreamIdentifier(f"c{group}", f"s{n}") for n in range(per_group)
        )
        for number in range(SUBSCRIBERS // groups):
            seen = T0 + timedelta(milliseconds=number)
            records.append(
                SubscriberRecord(
                    group=f"g{group:03}",
                    id=f"sub-{group}-{number:04}",
                    node_id=f"node-{number % 10}",
                    subscription_requests=requests,
                    registered_at=seen,
                    last_seen=seen,
                )
            )
    return records


def held(records: list[SubscriberRecord]) -> list[SourceHolding]:
    """The holdings once the first allocation of ``records`` is applied."""
    return [
        SourceHolding(
            group=change.group,
            source=change.source,
            subscriber_id=change.subscriber_id,
            node_id=change.node_id,
            epoch=change.epoch,
            state=HoldingState.ASSIGNED,
        )
        for allocation in allocate(records, [])
        for change in allocation.changes
        if isinstance(change, Assign)
    ]


def timed_round(records: list[SubscriberRecord], holdings: list[SourceHolding]) -> float:
    started = time.perf_counter()
    allocate(records, holdings)
    return time.perf_counter() - started


async def main() -> None:
    for groups in (1, 100):
        records = membership(groups)
        holdings = held(records)
        fresh = [timed_round(records, []) for _ in range(REPEATS)]
        joining = records[1:]  # the first subscriber of g000 joins a settled allocation
        settled = held(joining)
        join = [timed_round(records, settled) for _ in range(REPEATS)]
        steady = [timed_round(records, holdings) for _ in range(REPEATS)]
        shape = f"{SUBSCRIBERS}x{SOURCES}.groups_{groups}"
        for name, runs in (("empty", fresh), ("join", join), ("settled", steady)):
            report(f"allocation.{shape}.{name}", median(runs) * 1000, "ms", repeats=REPEATS)

"""The cost of parked streams (failure policy PARK) for a draining consumer.

For each backend (in memory, PostgreSQL): a category of 1,000 streams x 20 events
(20,000 events) is drained by an EventSourceConsumer with a failure policy and a
trivial processor, saving every 100 events, by a group with nothing parked and by a
group with 1 % of the streams (10) parked at their first event, so 1 % of the events
are held instead of processed. Reported: ``drain.parked_1pct``, the drain rate with
parked streams as a ratio to the rate with none (goal >= 0.9), both measured in the
same run, alternately, medians of 5; and the storage calls (each one SQL statement on
PostgreSQL) of a pass that finds no new events, with and without parked streams (a
parked stream costs no work per poll beyond reading the markers, which every pass with
a failure policy does once).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any

from benchmarks.common import median, report
from benchmarks.consumers import memory_backend, postgres_backend
from eventmill.backends.base import Backend, ParkedStream
from eventmill.consumers import (
    ConsumerSettings,
    EventConsumerStateStore,
    EventProcessor,
    EventSourceConsumer,
    FailurePolicy,
)
from eventmill.events import CategoryIdentifier, NewEvent, StoredEvent, StreamIdentifier
from eventmill.sources import EventSource
from eventmill.store import EventStore

REPEATS = 5
STREAMS = 1_000
EVENTS_PER_STREAM = 20
PARKED = 10
CATEGORY = CategoryIdentifier("parking")


class Nothing(EventProcessor):
    async def process_event(self, event: StoredEvent) -> None:
        return None


class Calls:
    """Counts calls of the storage methods that cost one statement each on PostgreSQL."""

    def __init__(self, backend: Backend) -> None:
        self.calls = 0
        self.targets = (
            (backend.events, "read"),
            (backend.checkpoints, "save"),
            (backend.checkpoints, "get"),
            (backend.parked, "list"),
            (backend.parked, "hold"),
        )
        for target, name in self.targets:
            setattr(target, name, self._counted(getattr(target, name)))

    def stop(self) -> None:
        for target, name in self.targets:
            delattr(target, name)

    def _counted(self, original: Callable[..., Any]) -> Callable[..., Any]:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await original(*args, **kwargs)

        return counted


async def fill(backend: Backend) -> None:
    store = EventStore(backend)
    for stream in range(STREAMS):
        await store.stream(category=CATEGORY.category, stream=f"s{stream}").publish(
            [NewEvent(name="happened", payload={"n": n}) for n in range(EVENTS_PER_STREAM)]
        )


async def park(backend: Backend, group: str) -> None:
    """Park ``PARKED`` streams spread over the category, at their first event."""
    now = datetime.now(UTC)
    for number in range(0, STREAMS, STREAMS // PARKED):
        stream = StreamIdentifier(CATEGORY.category, f"s{number}")
        [first] = await EventSource(backend, stream).read(after=None, limit=1)
        await backend.parked.park(
            ParkedStream(
                group=group,
                source=CATEGORY,
                stream=stream,
                sequence_number=first.sequence_number,
                position=0,
                event_name=first.name,
                held=1,
                last_held=first.sequence_number,
                error_type="ValueError",
                error_message="benchmark",
                traceback="",
                attempts=3,
                first_failed_at=now,
                last_failed_at=now,
            )
        )


def consumer(backend: Backend, group: str) -> EventSourceConsumer:
    return EventSourceConsumer(
        EventSource(backend, CATEGORY),
        Nothing(),
        EventConsumerStateStore(backend.checkpoints, group, CATEGORY),
        settings=ConsumerSettings(checkpoint_every=100),
        failure_policy=FailurePolicy(),
    )


async def drain(backend: Backend, group: str) -> tuple[float, int]:
    """Drain the category as ``group``; the rate and the calls of a following idle pass."""
    subject = consumer(backend, group)
    started = time.perf_counter()
    count = await subject.consume_all()
    rate = count / (time.perf_counter() - started)
    assert count == STREAMS * EVENTS_PER_STREAM, count
    calls = Calls(backend)
    try:
        assert await subject.consume_all() == 0
    finally:
        calls.stop()
    return rate, calls.calls


async def run(name: str, backend_of: Callable[[], AbstractAsyncContextManager[Any]]) -> None:
    async with backend_of() as backend:
        await fill(backend)
        plain: list[float] = []
        parked: list[float] = []
        idle = {"none": 0, "parked": 0}
        for repeat in range(REPEATS):
            await park(backend, f"parked-{repeat}")
            order = ("none", "parked") if repeat % 2 == 0 else ("parked", "none")
            for kind in order:
                rate, calls = await drain(backend, f"{kind}-{repeat}")
                (plain if kind == "none" else parked).append(rate)
                idle[kind] = calls
            held = sum(r.held for r in await backend.parked.list(group=f"parked-{repeat}"))
            assert held == PARKED * EVENTS_PER_STREAM, held
        ratios = [p / n for p, n in zip(parked, plain, strict=True)]
        report(
            f"{name}.drain.parked_1pct",
            median(ratios),
            "ratio",
            goal=">= 0.9",
            events_per_second_none=round(median(plain)),
            events_per_second_parked=round(median(parked)),
            events=STREAMS * EVENTS_PER_STREAM,
            parked_streams=PARKED,
            repeats=REPEATS,
        )
        report(
            f"{name}.idle_pass.statements",
            idle["parked"],
            "calls",
            with_none_parked=idle["none"],
            note="storage calls of a pass finding no new events, with 1% of streams parked",
        )


async def main() -> None:
    await run("memory", memory_backend)
    await run("postgres", postgres_backend)

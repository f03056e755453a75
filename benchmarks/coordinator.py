"""A full coordinator round on PostgreSQL for 1,000 subscribers and 5,000 sources
(100 groups of 10 instances and 50 stream sources each, on 10 nodes): the first round
(everything assigned: 5,000 fences and assignments), a settled round (nothing to
change) and a round after one subscriber left (its sources revoked). Each repeat runs
in a fresh schema; medians of ``REPEATS``."""

from __future__ import annotations

import os
import secrets
import time
from datetime import timedelta

from benchmarks.common import median, report
from eventmill.backends.postgres import PostgresBackend
from eventmill.broker.coordinator import EventSubscriptionCoordinator
from eventmill.events import EventSourceIdentifier, StreamIdentifier

DSN = os.environ.get("EVENTMILL_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REPEATS = 3
GROUPS = 100
INSTANCES = 10
SOURCES_PER_GROUP = 50
NODES = 10


async def register_all(backend: PostgresBackend) -> None:
    """Every subscriber alive now, one ``heartbeat_all`` per node."""
    per_node: dict[str, list[tuple[str, str, tuple[EventSourceIdentifier, ...]]]] = {}
    for group in range(GROUPS):
        requests: tuple[EventSourceIdentifier, ...] = tuple(
            StreamIdentifier(f"c{group}", f"s{n}") for n in range(SOURCES_PER_GROUP)
        )
        for instance in range(INSTANCES):
            node = f"node-{instance % NODES}"
            per_node.setdefault(node, []).append((f"g{group:03}", f"s{group}-{instance}", requests))
    for node, subscribers in per_node.items():
        await backend.subscribers.heartbeat_all(node, subscribers)


async def timed_round(coordinator: EventSubscriptionCoordinator) -> float:
    started = time.perf_counter()
    await coordinator.run_round()
    return time.perf_counter() - started


async def one_repeat() -> dict[str, float]:
    schema = f"em_bench_{secrets.token_hex(4)}"
    backend = await PostgresBackend.connect(DSN, schema=schema, min_size=1, max_size=5)
    try:
        await backend.install_schema()
        await register_all(backend)
        coordinator = EventSubscriptionCoordinator(
            backend, subscriber_max_age=timedelta(minutes=10)
        )
        figures = {"first": await timed_round(coordinator)}
        assert len(await backend.subscriptions.list()) == GROUPS * SOURCES_PER_GROUP
        figures["settled"] = await timed_round(coordinator)
        await backend.subscribers.remove("g000", "s0-0")
        figures["one_left"] = await timed_round(coordinator)
        await coordinator._give_up()
        return figures
    finally:
        async with backend.connection() as connection:
            await connection.execute(backend.sql("DROP SCHEMA {schema} CASCADE"))
        await backend.close()


async def main() -> None:
    runs = [await one_repeat() for _ in range(REPEATS)]
    shape = f"{GROUPS * INSTANCES}x{GROUPS * SOURCES_PER_GROUP}"
    for name in ("first", "settled", "one_left"):
        report(
            f"coordinator_round.postgres.{shape}.{name}",
            median([run[name] for run in runs]) * 1000,
            "ms",
            repeats=REPEATS,
        )

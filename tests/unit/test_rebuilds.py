"""Versioned projections on the in-memory backend: the version lifecycle (building,
serving, retiring, retired), progress reports, and a node that does not run a version
a newer one replaced."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

import pytest

from eventmill import EventProcessingNode, EventStore, NewEvent
from eventmill.backends.base import ConsumerTransaction, VersionState
from eventmill.backends.memory import InMemoryBackend
from eventmill.consumers.processors import TransactionalEventProcessor
from eventmill.errors import InvalidInputError, InvalidSettingsError
from eventmill.events import CategoryIdentifier, StoredEvent
from eventmill.rebuilds import ProjectionKeeper

ORDERS = CategoryIdentifier("orders")


class Counter(TransactionalEventProcessor):
    def __init__(self) -> None:
        self.seen = 0

    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        self.seen += len(events)


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + 10
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def register(node: EventProcessingNode, version: int, counter: Counter) -> None:
    node.register_projection(
        name="summary",
        version=version,
        source=ORDERS,
        processor=counter,
        cutover_lag=0,
        retire_grace=timedelta(0),
        check_interval=timedelta(milliseconds=10),
    )


async def test_versions_build_serve_and_retire_in_turn() -> None:
    backend = InMemoryBackend()
    store = EventStore(backend)
    await store.stream(category="orders", stream="o-1").publish(
        [NewEvent(name="placed") for _ in range(30)]
    )
    versions = backend.projection_versions

    async def states() -> dict[int, VersionState]:
        return {r.version: r.state for r in await versions.versions("summary")}

    first, second = Counter(), Counter()
    node = EventProcessingNode(backend, node_id="n")
    register(node, 1, first)
    async with node:

        async def v1_serves() -> bool:
            return await states() == {1: VersionState.SERVING}

        await wait_for(v1_serves, "version 1 to serve")
        register(node, 2, second)

        async def v2_took_over() -> bool:
            return await states() == {1: VersionState.RETIRED, 2: VersionState.SERVING}

        await wait_for(v2_took_over, "version 2 to take over and version 1 to retire")

        async def v1_stopped() -> bool:
            return [h.group for h in node.subscribers] == ["summary-v2"]

        await wait_for(v1_stopped, "version 1's subscriber to stop")
    assert first.seen == 30 and second.seen == 30
    records = {r.version: r for r in await versions.versions("summary")}
    assert records[2].behind == 0

    # A node started later with version 1 does not run it.
    late = EventProcessingNode(backend, node_id="late")
    register(late, 1, Counter())
    async with late:
        assert late.subscribers == []


async def test_progress_counts_the_events_left() -> None:
    backend = InMemoryBackend()
    store = EventStore(backend)
    await store.stream(category="orders", stream="o-1").publish(
        [NewEvent(name="placed") for _ in range(12)]
    )
    keeper = ProjectionKeeper(backend, name="summary", version=1, sources=[ORDERS])
    assert await keeper.prepare()
    assert await keeper.progress() == (12, None)
    await backend.checkpoints.save("summary-v1", ORDERS, 4, expected_version=None)
    behind, eta = await keeper.progress()
    assert behind == 8 and eta is not None and eta >= 0


class Gated(Counter):
    """A Counter whose batches wait for ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        await self.gate.wait()
        await super().process_events(events, transaction)


async def test_the_end_of_a_building_pass_wakes_the_keeper() -> None:
    backend = InMemoryBackend()
    store = EventStore(backend)
    await store.stream(category="orders", stream="o-1").publish(
        [NewEvent(name="placed") for _ in range(30)]
    )
    versions = backend.projection_versions
    counter = Gated()
    node = EventProcessingNode(backend, node_id="n")
    node.register_projection(
        name="summary",
        version=1,
        source=ORDERS,
        processor=counter,
        cutover_lag=0,
        check_interval=timedelta(hours=1),  # only a wake-up can bring the cutover
    )
    async with node:

        async def first_round_ran() -> bool:
            return [r.behind for r in await versions.versions("summary")] == [30]

        await wait_for(first_round_ran, "the keeper's first round")
        counter.gate.set()

        async def serves() -> bool:
            return [r.state for r in await versions.versions("summary")] == [VersionState.SERVING]

        await wait_for(serves, "version 1 to serve once its pass ended")
    assert counter.seen == 30


def test_bad_registrations_are_refused() -> None:
    node = EventProcessingNode(InMemoryBackend(), node_id="n")
    with pytest.raises(InvalidSettingsError):
        node.register_projection(name="Bad Name", version=1, source=ORDERS, processor=Counter())
    with pytest.raises(InvalidSettingsError):
        node.register_projection(name="ok", version=0, source=ORDERS, processor=Counter())

    async def plain(event: StoredEvent) -> None:
        return None

    with pytest.raises(InvalidInputError):
        node.register_projection(name="ok", version=1, source=ORDERS, processor=plain)  # type: ignore[arg-type]
    assert node.subscribers == []

"""SingletonEventBroker: balanced, sticky, revoke-then-assign, fenced epochs, in memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from eventmill.backends.memory import InMemoryBackend
from eventmill.broker.singleton import SingletonEventBroker
from eventmill.errors import InvalidInputError, LifecycleError, StaleEpochError
from eventmill.events import EventSourceIdentifier, StreamIdentifier
from eventmill.services.status import ProcessStatus

SOURCES = tuple(StreamIdentifier("orders", f"order-{n}") for n in range(4))


class FakeSubscriber:
    """Records what it holds; ``owners`` is shared to catch two holders at once."""

    def __init__(
        self,
        id: str,
        owners: dict[EventSourceIdentifier, str],
        requests: Sequence[EventSourceIdentifier] = SOURCES,
        group: str = "g",
    ) -> None:
        self._id = id
        self._group = group
        self._requests = tuple(requests)
        self.owners = owners
        self.held: dict[EventSourceIdentifier, int] = {}
        self.dropped: dict[EventSourceIdentifier, int] = {}
        self.log: list[tuple[str, EventSourceIdentifier, int | None]] = []

    @property
    def group(self) -> str:
        return self._group

    @property
    def id(self) -> str:
        return self._id

    @property
    def subscription_requests(self) -> Sequence[EventSourceIdentifier]:
        return self._requests

    async def accept(self, source: EventSourceIdentifier, epoch: int) -> None:
        owner = self.owners.get(source)
        assert owner in (None, self._id), f"{source} accepted by {self._id} held by {owner}"
        self.owners[source] = self._id
        self.held[source] = epoch
        self.log.append(("accept", source, epoch))

    async def withdraw(self, source: EventSourceIdentifier) -> None:
        if source in self.held:
            del self.held[source]
            del self.owners[source]
            self.log.append(("withdraw", source, None))

    def drop(self, source: EventSourceIdentifier) -> None:
        """Stop holding ``source`` by itself, as on a StaleEpochError."""
        self.dropped[source] = self.held.pop(source)
        del self.owners[source]
        self.log.append(("drop", source, self.dropped[source]))

    async def take_dropped(self) -> dict[EventSourceIdentifier, int]:
        dropped, self.dropped = self.dropped, {}
        return dropped

    def health(self) -> ProcessStatus:
        return ProcessStatus.WAITING


@pytest.fixture
async def broker() -> AsyncIterator[SingletonEventBroker]:
    backend = InMemoryBackend()
    broker = SingletonEventBroker(backend)
    task = asyncio.create_task(broker.execute())
    yield broker
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert broker.status is ProcessStatus.STOPPED


async def test_sources_are_shared_out_evenly_and_stickily(broker: SingletonEventBroker) -> None:
    owners: dict[EventSourceIdentifier, str] = {}
    a, b, c = (FakeSubscriber(name, owners) for name in "abc")
    await broker.register(a)
    await broker.wait_ready()
    assert set(a.held) == set(SOURCES)
    assert set(a.held.values()) == {1}

    await broker.register(b)
    await broker.wait_ready()
    assert (len(a.held), len(b.held)) == (2, 2)
    moved = set(b.held)
    assert set(b.held.values()) == {2}  # fenced anew when moved

    await broker.register(c)
    await broker.wait_ready()
    assert sorted(len(s.held) for s in (a, b, c)) == [1, 1, 2]
    assert len(c.held) == 1
    # Sticky: only one source moved to the newcomer, nothing moved between a and b.
    assert set(b.held) <= moved
    assert set(owners) == set(SOURCES)


async def test_unregister_withdraws_then_moves_sources_at_once(
    broker: SingletonEventBroker,
) -> None:
    owners: dict[EventSourceIdentifier, str] = {}
    a, b = FakeSubscriber("a", owners), FakeSubscriber("b", owners)
    await broker.register(a)
    await broker.register(b)
    await broker.wait_ready()
    given_to_a = set(a.held)
    await broker.unregister(a)
    assert a.held == {}
    await broker.wait_ready()
    assert set(b.held) == set(SOURCES)
    for source in given_to_a:
        assert b.held[source] == 2
    await broker.unregister(a)  # harmless a second time


async def test_checkpoints_are_fenced_so_a_former_holder_cannot_save(
    broker: SingletonEventBroker,
) -> None:
    owners: dict[EventSourceIdentifier, str] = {}
    a, b = FakeSubscriber("a", owners), FakeSubscriber("b", owners)
    await broker.register(a)
    await broker.wait_ready()
    await broker.register(b)
    await broker.wait_ready()
    source = next(iter(b.held))
    checkpoints = broker.backend.checkpoints
    stored = await checkpoints.get("g", source)
    assert stored is not None and stored.epoch == 2
    with pytest.raises(StaleEpochError):
        await checkpoints.save("g", source, 5, expected_version=stored.version, epoch=1)


async def test_epochs_continue_from_stored_checkpoints() -> None:
    backend = InMemoryBackend()
    await backend.checkpoints.fence("g", SOURCES[0], 7)
    broker = SingletonEventBroker(backend)
    task = asyncio.create_task(broker.execute())
    try:
        subscriber = FakeSubscriber("a", {})
        await broker.register(subscriber)
        await broker.wait_ready()
        assert subscriber.held[SOURCES[0]] == 8
        assert subscriber.held[SOURCES[1]] == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_groups_are_independent_and_unrequested_sources_are_released(
    broker: SingletonEventBroker,
) -> None:
    owners: dict[EventSourceIdentifier, str] = {}
    other_owners: dict[EventSourceIdentifier, str] = {}
    a = FakeSubscriber("a", owners)
    other = FakeSubscriber("a", other_owners, requests=SOURCES[:1], group="h")
    await broker.register(a)
    await broker.register(other)
    await broker.wait_ready()
    assert set(a.held) == set(SOURCES)
    assert set(other.held) == {SOURCES[0]}
    await broker.unregister(other)
    await broker.wait_ready()
    assert [h.state.value for h in broker.holdings() if h.group == "h"] == ["released"]


async def test_registering_twice_is_refused(broker: SingletonEventBroker) -> None:
    owners: dict[EventSourceIdentifier, str] = {}
    await broker.register(FakeSubscriber("a", owners))
    with pytest.raises(InvalidInputError):
        await broker.register(FakeSubscriber("a", owners))


async def test_runs_once_and_wait_ready_after_stop_raises() -> None:
    broker = SingletonEventBroker(InMemoryBackend())
    task = asyncio.create_task(broker.execute())
    await broker.wait_ready()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await broker.register(FakeSubscriber("late", {}))
    with pytest.raises(LifecycleError):
        await broker.wait_ready()
    with pytest.raises(LifecycleError):
        await broker.execute()

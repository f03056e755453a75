"""The checkpoint storage contract, run against every backend."""

from __future__ import annotations

import pytest

from eventmill import (
    CategoryIdentifier,
    CategoryPartitionIdentifier,
    ConflictError,
    LogIdentifier,
    StaleEpochError,
    StreamIdentifier,
)
from eventmill.backends.base import Backend
from eventmill.events import EventSourceIdentifier, source_key

ORDERS = CategoryIdentifier("orders")


async def test_first_save_creates_and_later_saves_need_the_version(backend: Backend) -> None:
    checkpoints = backend.checkpoints
    assert await checkpoints.get("g", ORDERS) is None
    first = await checkpoints.save("g", ORDERS, 5, expected_version=None)
    assert (first.group, first.source, first.after, first.version) == ("g", ORDERS, 5, 1)
    assert await checkpoints.get("g", ORDERS) == first
    with pytest.raises(ConflictError):
        await checkpoints.save("g", ORDERS, 6, expected_version=None)
    with pytest.raises(ConflictError):
        await checkpoints.save("g", ORDERS, 6, expected_version=7)
    second = await checkpoints.save("g", ORDERS, 9, expected_version=1)
    assert (second.after, second.version) == (9, 2)
    assert second.updated_at >= first.updated_at
    assert await checkpoints.get("g", ORDERS) == second


async def test_groups_and_sources_are_separate(backend: Backend) -> None:
    checkpoints = backend.checkpoints
    sources: list[EventSourceIdentifier] = [
        LogIdentifier(),
        ORDERS,
        StreamIdentifier("orders", "o-1"),
        CategoryPartitionIdentifier("orders", 1, 4),
    ]
    for number, source in enumerate(sources):
        await checkpoints.save("a", source, number, expected_version=None)
        await checkpoints.save("b", source, number + 100, expected_version=None)
    for number, source in enumerate(sources):
        a, b = await checkpoints.get("a", source), await checkpoints.get("b", source)
        assert a is not None and b is not None
        assert (a.after, b.after, a.source) == (number, number + 100, source)
    listed = await checkpoints.list("a")
    assert {c.source for c in listed} == set(sources) and {c.group for c in listed} == {"a"}
    assert len(await checkpoints.list()) == 8
    assert [c.group for c in await checkpoints.list()] == ["a"] * 4 + ["b"] * 4
    await checkpoints.reset("b", sources[0])
    places = {(c.group, source_key(c.source)): c.after for c in await checkpoints.list()}
    assert places[("b", source_key(sources[0]))] is None
    assert await checkpoints.places() == places
    assert await checkpoints.places("a") == {k: v for k, v in places.items() if k[0] == "a"}


async def test_reset_persists_and_bumps_the_version(backend: Backend) -> None:
    checkpoints = backend.checkpoints
    await checkpoints.save("g", ORDERS, 5, expected_version=None)
    await checkpoints.reset("g", ORDERS)
    reset = await checkpoints.get("g", ORDERS)
    assert reset is not None and (reset.after, reset.version) == (None, 2)
    with pytest.raises(ConflictError):
        await checkpoints.save("g", ORDERS, 7, expected_version=1)
    await checkpoints.reset("g", CategoryIdentifier("nothing-here"))
    assert await checkpoints.get("g", CategoryIdentifier("nothing-here")) is None


async def test_fence_refuses_saves_of_older_epochs(backend: Backend) -> None:
    checkpoints = backend.checkpoints
    await checkpoints.fence("g", ORDERS, 3)
    fenced = await checkpoints.get("g", ORDERS)
    assert fenced is not None and (fenced.after, fenced.version, fenced.epoch) == (None, 1, 3)
    with pytest.raises(StaleEpochError):
        await checkpoints.save("g", ORDERS, 10, expected_version=1, epoch=2)
    unchanged = await checkpoints.get("g", ORDERS)
    assert unchanged == fenced
    saved = await checkpoints.save("g", ORDERS, 10, expected_version=1, epoch=3)
    assert (saved.after, saved.version, saved.epoch) == (10, 2, 3)
    await checkpoints.fence("g", ORDERS, 5)
    await checkpoints.fence("g", ORDERS, 4)  # never lowers
    after_fences = await checkpoints.get("g", ORDERS)
    assert after_fences is not None
    assert (after_fences.after, after_fences.version, after_fences.epoch) == (10, 2, 5)
    with pytest.raises(StaleEpochError):
        await checkpoints.save("g", ORDERS, 11, expected_version=2, epoch=3)
    higher = await checkpoints.save("g", ORDERS, 11, expected_version=2, epoch=6)
    assert higher.epoch == 6
    unfenced = await checkpoints.save("g", ORDERS, 12, expected_version=3)
    assert (unfenced.after, unfenced.epoch) == (12, 6)


async def test_stale_epoch_wins_over_a_version_conflict(backend: Backend) -> None:
    await backend.checkpoints.fence("g", ORDERS, 9)
    with pytest.raises(StaleEpochError):
        await backend.checkpoints.save("g", ORDERS, 1, expected_version=None, epoch=1)


async def test_transaction_commits_or_rolls_back_the_save(backend: Backend) -> None:
    checkpoints = backend.checkpoints
    async with checkpoints.transaction() as transaction:
        saved = await transaction.save_checkpoint("g", ORDERS, 4, expected_version=None)
    assert await checkpoints.get("g", ORDERS) == saved

    class Boom(Exception):
        pass

    async def save_then_fail() -> None:
        async with checkpoints.transaction() as transaction:
            await transaction.save_checkpoint("g", ORDERS, 8, expected_version=1)
            raise Boom

    with pytest.raises(Boom):
        await save_then_fail()
    assert await checkpoints.get("g", ORDERS) == saved
    with pytest.raises(ConflictError):
        async with checkpoints.transaction() as transaction:
            await transaction.save_checkpoint("g", ORDERS, 8, expected_version=5)

"""The projection storage contract (through ProjectionStore), run against every backend."""

from __future__ import annotations

import pytest

from eventmill import CategoryIdentifier, InvalidEventError, InvalidInputError
from eventmill.backends.base import Backend, Projection
from eventmill.projections import ProjectionStore


async def test_save_get_replace_delete(backend: Backend) -> None:
    store = ProjectionStore(backend, "totals")
    assert await store.get("a") is None
    first = await store.save("a", {"total": 1, "tags": ["x"], "nested": {"k": None}})
    assert (first.name, first.id, first.version) == ("totals", "a", 1)
    second = await store.save("a", {"total": 2})
    assert second.version == 2 and second.state == {"total": 2}
    assert await store.get("a") == second
    assert await ProjectionStore(backend, "other").get("a") is None
    assert await store.delete("a") is True
    assert await store.delete("a") is False
    assert await store.get("a") is None


async def test_find_filters_sorts_and_pages(backend: Backend) -> None:
    store = ProjectionStore(backend, "orders")
    rows = {
        "o1": {"status": "open", "total": 30, "vip": True},
        "o2": {"status": "open", "total": 10, "vip": False},
        "o3": {"status": "closed", "total": 20, "vip": False},
        "o4": {"status": "open", "vip": False},
        "o5": {"status": "open", "total": None, "vip": True},
        "o6": {"status": "open", "total": 10.5, "vip": False},
    }
    for id, state in rows.items():
        await store.save(id, state)  # type: ignore[arg-type]
    await ProjectionStore(backend, "elsewhere").save("o9", {"status": "open"})

    def ids(found: list[Projection]) -> list[str]:
        return [p.id for p in found]

    assert ids(await store.find()) == ["o1", "o2", "o3", "o4", "o5", "o6"]
    assert ids(await store.find(where={"status": "open", "vip": False})) == ["o2", "o4", "o6"]
    assert ids(await store.find(where={"vip": True})) == ["o1", "o5"]
    assert ids(await store.find(where={"total": 10})) == ["o2"]
    assert ids(await store.find(where={"total": None})) == ["o5"]
    assert ids(await store.find(where={"status": "gone"})) == []
    assert ids(await store.find(order_by="total")) == ["o2", "o6", "o3", "o1", "o4", "o5"]
    assert ids(await store.find(order_by="total", descending=True)) == [
        "o1",
        "o3",
        "o6",
        "o2",
        "o4",
        "o5",
    ]
    assert ids(await store.find(where={"status": "open"}, order_by="total", limit=2)) == [
        "o2",
        "o6",
    ]
    assert ids(await store.find(order_by="total", limit=2, offset=3)) == ["o1", "o4"]
    assert ids(await store.find(limit=0)) == []


async def test_bad_queries_and_states_are_refused(backend: Backend) -> None:
    store = ProjectionStore(backend, "p")
    with pytest.raises(InvalidInputError):
        await store.find(where={"k": [1]})  # type: ignore[dict-item]
    with pytest.raises(InvalidInputError):
        await store.find(limit=-1)
    with pytest.raises(InvalidInputError):
        await store.find(offset=-1)
    with pytest.raises(InvalidEventError):
        await store.save("a", {"bad": object()})  # type: ignore[dict-item]
    with pytest.raises(InvalidInputError):
        await store.save("", {})


async def test_writes_in_a_rolled_back_transaction_are_undone(backend: Backend) -> None:
    store = ProjectionStore(backend, "p")
    await store.save("kept", {"n": 1})

    class Boom(Exception):
        pass

    async def write_then_fail() -> None:
        async with backend.checkpoints.transaction() as transaction:
            await store.save("kept", {"n": 2}, transaction=transaction)
            await store.save("new", {"n": 3}, transaction=transaction)
            await store.delete("kept", transaction=transaction)
            await transaction.save_checkpoint(
                "g", CategoryIdentifier("c"), 1, expected_version=None
            )
            raise Boom

    with pytest.raises(Boom):
        await write_then_fail()
    kept = await store.get("kept")
    assert kept is not None and kept.state == {"n": 1}
    assert await store.get("new") is None
    assert await backend.checkpoints.get("g", CategoryIdentifier("c")) is None
    async with backend.checkpoints.transaction() as transaction:
        await store.save("new", {"n": 4}, transaction=transaction)
        assert (await store.get("new", transaction=transaction)) is not None
    new = await store.get("new")
    assert new is not None and new.state == {"n": 4}

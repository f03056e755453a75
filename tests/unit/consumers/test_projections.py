"""Projector's handler registry, and ProjectionProcessor keeping a projection up to date."""

from __future__ import annotations

import pytest

from eventmill import CategoryIdentifier, InvalidSettingsError, NewEvent
from eventmill.backends.base import Backend
from eventmill.consumers import make_subscriber
from eventmill.events import JsonObject, StoredEvent
from eventmill.projections import ProjectionProcessor, ProjectionStore, Projector, handles
from eventmill.store import EventStore


class OrderTotals(Projector):
    name = "order-totals"

    @handles("order-placed")
    def placed(self, state: JsonObject, event: StoredEvent) -> JsonObject:
        return {"total": event.payload["total"], "status": "open", "lines": 0}

    @handles("line-added", "line-restored")
    def line(self, state: JsonObject, event: StoredEvent) -> JsonObject:
        lines = state["lines"]
        assert isinstance(lines, int)
        return {**state, "lines": lines + 1}


class ClosingTotals(OrderTotals):
    @handles("order-closed")
    def closed(self, state: JsonObject, event: StoredEvent) -> JsonObject:
        return {**state, "status": "closed"}


def test_the_registry_is_built_when_the_class_is_made() -> None:
    assert {name: handler.attribute for name, handler in OrderTotals.handlers.items()} == {
        "order-placed": "placed",
        "line-added": "line",
        "line-restored": "line",
    }
    assert ClosingTotals.handlers["order-closed"].attribute == "closed"
    assert "order-closed" not in OrderTotals.handlers


def test_bad_registries_fail_at_class_creation() -> None:
    with pytest.raises(InvalidSettingsError):

        class Twice(Projector):
            name = "twice"

            @handles("a")
            def one(self, state: JsonObject, event: StoredEvent) -> JsonObject:
                return state

            @handles("a")
            def two(self, state: JsonObject, event: StoredEvent) -> JsonObject:
                return state

    with pytest.raises(InvalidSettingsError):

        class WrongArity(Projector):
            name = "arity"

            @handles("a")
            def one(self, event: StoredEvent) -> JsonObject:
                return {}

    with pytest.raises(InvalidSettingsError):
        handles()


async def test_a_projection_processor_keeps_states_up_to_date(backend: Backend) -> None:
    store = EventStore(backend)
    for order in range(3):
        await store.stream(category="orders", stream=f"o{order}").publish(
            [
                NewEvent(name="order-placed", payload={"total": 10 * order}),
                NewEvent(name="line-added"),
                NewEvent(name="ignored"),
            ]
        )
    await store.stream(category="orders", stream="o1").publish([NewEvent(name="order-closed")])
    projections = ProjectionStore(backend, ClosingTotals.name)
    subscriber = make_subscriber(
        backend,
        group="totals",
        sources=CategoryIdentifier("orders"),
        processor=ProjectionProcessor(ClosingTotals(), projections),
        checkpoint_every=4,
    )
    await subscriber.accept(CategoryIdentifier("orders"), 1)
    assert await subscriber.consume_all() == 10
    found = await projections.find(order_by="total", descending=True)
    assert [(p.id, p.state) for p in found] == [
        ("o2", {"total": 20, "status": "open", "lines": 1}),
        ("o1", {"total": 10, "status": "closed", "lines": 1}),
        ("o0", {"total": 0, "status": "open", "lines": 1}),
    ]
    await store.stream(category="orders", stream="o2").publish([NewEvent(name="line-added")])
    assert await subscriber.consume_all() == 1
    o2 = await projections.get("o2")
    assert o2 is not None and o2.state["lines"] == 2

"""The README-style application module runs as written, and needs no type: ignore to
pass mypy --strict (make test's mypy covers tests/typing)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from uuid import uuid4

from eventmill import EventStore, JsonObject, NewEvent, ProjectionStore
from eventmill.backends.memory import InMemoryBackend
from tests.typing.orders_app import OrderPaid, OrderPlaced, OrderTotals, make_node


def test_the_module_needs_no_type_ignore() -> None:
    source = (Path(__file__).parent / "orders_app.py").read_text()
    assert "# type: ignore" not in source and "Any" not in source


async def test_the_module_runs() -> None:
    backend = InMemoryBackend()
    order = uuid4()
    node, revenue, payments = make_node(backend)
    async with node:
        stream = EventStore(backend).stream(category="orders", stream=str(order))
        old: JsonObject = {
            "order_id": str(order),
            "total": "4.50",
            "at": "2024-01-01T00:00Z",
        }
        await stream.publish(
            [
                NewEvent(name="order-placed", payload=old),
                OrderPlaced(order, Decimal("3"), "CHF", datetime.now(UTC)),
                OrderPaid(order, Decimal("7.50")),
            ]
        )
        await node.wait_caught_up(timeout=30)
    assert revenue.by_currency == {"EUR": Decimal("4.50"), "CHF": Decimal("3")}
    assert payments.in_memory == [OrderPaid(order, Decimal("7.50"))]
    projection = await ProjectionStore(backend, OrderTotals.name).get(str(order))
    assert projection is not None
    assert projection.state == {"total": "3", "currency": "CHF", "paid": "7.50"}

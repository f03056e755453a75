"""An application module written the README way; ``make test`` type-checks it with
``mypy --strict`` (it must need no ignore comments) and test_orders_app.py runs it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from uuid import UUID

from eventmill import (
    Backend,
    CategoryIdentifier,
    ConsumerTransaction,
    EventProcessingNode,
    EventTypes,
    HandlerProcessor,
    JsonObject,
    ProjectionProcessor,
    ProjectionStore,
    Projector,
    StoredEvent,
    TransactionalEventProcessor,
    handles,
)

types = EventTypes()


@types.event("order-placed", version=2)
@dataclass(frozen=True)
class OrderPlaced:
    order_id: UUID
    total: Decimal
    currency: str
    at: datetime


@types.upcaster("order-placed", from_version=1)
def add_currency(payload: JsonObject) -> JsonObject:
    return {**payload, "currency": "EUR"}


@types.event("order-paid")
@dataclass(frozen=True)
class OrderPaid:
    order_id: UUID
    amount: Decimal


class OrderTotals(Projector):
    name = "order-totals"

    @handles(OrderPlaced)
    def placed(self, state: JsonObject, event: OrderPlaced) -> JsonObject:
        return {**state, "total": str(event.total * 2 / 2), "currency": event.currency}

    @handles(OrderPaid)
    def paid(self, state: JsonObject, event: OrderPaid) -> JsonObject:
        return {**state, "paid": str(event.amount)}


class Revenue(HandlerProcessor):
    def __init__(self) -> None:
        self.by_currency: dict[str, Decimal] = {}

    @handles(OrderPlaced)
    async def placed(self, event: OrderPlaced) -> None:
        self.by_currency[event.currency] = self.by_currency.get(event.currency, Decimal(0))
        self.by_currency[event.currency] += event.total


class PaymentsTable(TransactionalEventProcessor):
    """Writes each payment in the consumer's transaction (exactly-once on PostgreSQL)."""

    def __init__(self) -> None:
        self.in_memory: list[OrderPaid] = []

    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        payments = [
            types.decode_as(event, OrderPaid) for event in events if event.name == "order-paid"
        ]
        connection = transaction.connection
        if connection is None:
            self.in_memory.extend(payments)
            return
        async with connection.cursor() as cursor:
            await cursor.executemany(
                "INSERT INTO payments (order_id, amount) VALUES (%s, %s)",
                [(payment.order_id, payment.amount) for payment in payments],
            )


def make_node(backend: Backend) -> tuple[EventProcessingNode, Revenue, PaymentsTable]:
    node = EventProcessingNode(backend, node_id="orders-app")
    orders = CategoryIdentifier("orders")
    revenue = Revenue()
    payments = PaymentsTable()
    node.register_subscriber(group="revenue", source=orders, processor=revenue)
    node.register_subscriber(group="payments", source=orders, processor=payments)
    node.register_subscriber(
        group="order-totals",
        source=orders,
        processor=ProjectionProcessor(OrderTotals(), ProjectionStore(backend, OrderTotals.name)),
    )
    return node, revenue, payments

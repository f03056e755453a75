"""Typed events on every backend: publish an instance, read it back as its class;
stored v1 events read through chained upcasters by v3 code; unknown names, newer
versions, missing upcasters and unfit payloads raise EventDecodingError."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from enum import StrEnum
from typing import Any
from uuid import UUID, uuid4

import msgspec
import pydantic
import pytest

from eventmill import (
    CategoryIdentifier,
    EventDecodingError,
    EventStore,
    EventTypes,
    HandlerProcessor,
    InvalidEventError,
    InvalidSettingsError,
    JsonObject,
    NewEvent,
    ProjectionProcessor,
    ProjectionStore,
    Projector,
    StoredEvent,
    encode_event,
    handles,
    make_subscriber,
)
from eventmill.backends.base import Backend
from eventmill.event_types import VERSION_KEY

types = EventTypes()


class Status(StrEnum):
    OPEN = "open"
    PAID = "paid"


class OrderId(str):
    """A str subclass: stored as text, read back as an OrderId."""


@dataclass(frozen=True)
class Line:
    sku: str
    price: Decimal
    quantity: int = 1


@types.event("order-placed", version=3)
@dataclass(frozen=True)
class OrderPlaced:
    order_id: OrderId
    customer: UUID
    at: datetime
    lines: tuple[Line, ...]
    total: Decimal
    currency: str
    status: Status = Status.OPEN
    note: str | None = None
    tags: list[str] = field(default_factory=list)


@types.upcaster("order-placed", from_version=1)
def v1_to_v2(payload: JsonObject) -> JsonObject:
    """v1 had one ``amount`` (a float) and no lines; v2 has lines and an exact total."""
    amount = payload["amount"]
    assert isinstance(amount, float | int)
    total = str(Decimal(str(amount)))
    rest = {key: value for key, value in payload.items() if key != "amount"}
    return {**rest, "lines": [{"sku": "unknown", "price": total}], "total": total}


@types.upcaster("order-placed", from_version=2)
def v2_to_v3(payload: JsonObject) -> JsonObject:
    """v3 adds the currency."""
    return {**payload, "currency": "EUR"}


@types.event("order-paid")
@dataclass(frozen=True)
class OrderPaid:
    order_id: OrderId
    amount: Decimal


def placed(order: str = "o-1") -> OrderPlaced:
    return OrderPlaced(
        order_id=OrderId(order),
        customer=uuid4(),
        at=datetime(2024, 5, 17, 9, 30, 12, 123456, tzinfo=timezone(timedelta(hours=2))),
        lines=(Line("a", Decimal("10.10"), 2), Line("b", Decimal("0.05"))),
        total=Decimal("20.25"),
        currency="CHF",
        tags=["gift"],
    )


async def test_a_typed_event_reads_back_equal(backend: Backend) -> None:
    store = EventStore(backend)
    event = placed()
    (stored,) = await store.stream(category="orders", stream="o-1").publish([event])
    assert stored.name == "order-placed"
    assert stored.metadata == {VERSION_KEY: 3}
    assert stored.payload["total"] == "20.25"
    (read,) = await store.stream(category="orders", stream="o-1").read()
    decoded = types.decode_as(read, OrderPlaced)
    assert decoded == event
    assert type(decoded.order_id) is OrderId and decoded.status is Status.OPEN
    assert decoded.at.utcoffset() == timedelta(hours=2)


async def test_typed_and_dict_events_publish_together_with_metadata(backend: Backend) -> None:
    store = EventStore(backend)
    stream = store.stream(category="orders", stream="o-2")
    at = datetime(2024, 1, 1, tzinfo=UTC)
    paid = OrderPaid(OrderId("o-2"), Decimal("1E+3"))
    await stream.publish(
        [
            NewEvent(name="note", payload={"text": "hi"}),
            encode_event(paid, metadata={"user": "ann"}, occurred_at=at),
        ]
    )
    note, read = await stream.read()
    assert note.payload == {"text": "hi"} and not types.knows(note)
    assert read.metadata == {"user": "ann", VERSION_KEY: 1}
    assert read.occurred_at == at
    assert types.decode(read) == paid
    assert str(types.decode_as(read, OrderPaid).amount) == "1E+3"


async def test_a_stored_v1_event_is_read_by_v3_code(backend: Backend) -> None:
    store = EventStore(backend)
    customer = uuid4()
    v1: JsonObject = {
        "order_id": "o-9",
        "customer": str(customer),
        "at": "2020-02-29T23:59:59+00:00",
        "amount": 12.5,
    }
    v2: JsonObject = {**v1, "lines": [{"sku": "x", "price": "3"}], "total": "3"}
    del v2["amount"]
    stream = store.stream(category="orders", stream="o-9")
    await stream.publish(
        [
            NewEvent(name="order-placed", payload=v1),  # written before typing: version 1
            NewEvent(name="order-placed", payload=v2, metadata={VERSION_KEY: 2}),
        ]
    )
    first, second = (types.decode_as(event, OrderPlaced) for event in await stream.read())
    assert first == OrderPlaced(
        order_id=OrderId("o-9"),
        customer=customer,
        at=datetime(2020, 2, 29, 23, 59, 59, tzinfo=UTC),
        lines=(Line("unknown", Decimal("12.5")),),
        total=Decimal("12.5"),
        currency="EUR",
    )
    assert second.lines == (Line("x", Decimal(3)),) and second.currency == "EUR"


def stored(name: str, payload: JsonObject, metadata: JsonObject | None = None) -> StoredEvent:
    now = datetime.now(UTC)
    return StoredEvent(
        id="e-1",
        name=name,
        category="orders",
        stream="o",
        position=0,
        sequence_number=1,
        payload=payload,
        metadata=metadata or {},
        occurred_at=now,
        observed_at=now,
    )


def test_what_cannot_be_decoded_raises_a_clear_error() -> None:
    payload = encode_event(placed()).payload
    cases = {
        "no event class is registered for 'order-shipped'": stored("order-shipped", {}),
        "version 4 is newer than OrderPlaced (version 3)": stored(
            "order-placed", payload, {VERSION_KEY: 4}
        ),
        "must be an int >= 1": stored("order-placed", payload, {VERSION_KEY: "2"}),
        "OrderPlaced has no field colour": stored(
            "order-placed", {**payload, "colour": "red"}, {VERSION_KEY: 3}
        ),
        "OrderPlaced needs currency": stored(
            "order-placed", {k: v for k, v in payload.items() if k != "currency"}, {VERSION_KEY: 3}
        ),
        ".total: cannot read 'twelve' as Decimal": stored(
            "order-placed", {**payload, "total": "twelve"}, {VERSION_KEY: 3}
        ),
        ".at: expected a timezone-aware datetime": stored(
            "order-placed", {**payload, "at": "2024-01-01T00:00:00"}, {VERSION_KEY: 3}
        ),
        ".status: cannot read 'lost' as Status": stored(
            "order-placed", {**payload, "status": "lost"}, {VERSION_KEY: 3}
        ),
        "is a OrderPaid, not a OrderPlaced": stored("order-paid", {"order_id": "o", "amount": "1"}),
    }
    for message, event in cases.items():
        with pytest.raises(EventDecodingError) as raised:
            types.decode_as(event, OrderPlaced)
        assert message in str(raised.value)

    gapped = EventTypes()

    @gapped.event("order-placed", version=3)
    @dataclass(frozen=True)
    class Placed:
        total: int

    @gapped.upcaster("order-placed", from_version=1)
    def only_first(payload: JsonObject) -> JsonObject:
        return payload

    with pytest.raises(EventDecodingError, match="no upcaster for 'order-placed' from version 2"):
        gapped.decode(stored("order-placed", {"total": 1}))


def test_bad_registrations_and_publishes_are_refused() -> None:
    registry = EventTypes()

    with pytest.raises(InvalidSettingsError, match="dataclass"):

        @registry.event("plain")
        class Plain:
            pass

    @registry.event("a")
    @dataclass
    class A:
        x: int

    with pytest.raises(InvalidSettingsError, match="already registered"):

        @registry.event("a")
        @dataclass
        class Other:
            x: int

    with pytest.raises(InvalidSettingsError, match="version"):
        registry.event("b", version=0)
    registry.upcaster("a", from_version=1)(lambda payload: payload)
    with pytest.raises(InvalidSettingsError, match="already has an upcaster"):
        registry.upcaster("a", from_version=1)(lambda payload: payload)
    with pytest.raises(InvalidSettingsError, match="not a registered event class"):
        handles(int)
    with pytest.raises(InvalidEventError, match="registered event instances"):
        encode_event(object())
    with pytest.raises(InvalidEventError, match="reserved"):
        encode_event(A(1), metadata={VERSION_KEY: 5})
    with pytest.raises(InvalidEventError, match="timezone-aware"):
        encode_event(OrderPaid(OrderId("o"), Decimal(1)), occurred_at=datetime(2024, 1, 1))
    with pytest.raises(InvalidEventError, match=r"payload.x: cannot encode object"):
        encode_event(A(object()))  # type: ignore[arg-type]


class PlacedTotals(Projector):
    name = "placed-totals"

    @handles(OrderPlaced)
    def placed(self, state: JsonObject, event: OrderPlaced) -> JsonObject:
        return {**state, "total": str(event.total), "currency": event.currency}

    @handles(OrderPaid, "order-refunded")
    def paid(self, state: JsonObject, event: object) -> JsonObject:
        if isinstance(event, OrderPaid):
            return {**state, "paid": str(event.amount)}
        return {**state, "refunded": True}


class Collector(HandlerProcessor):
    def __init__(self) -> None:
        self.seen: list[object] = []

    @handles(OrderPaid)
    async def paid(self, event: OrderPaid) -> None:
        self.seen.append(event)

    @handles("note")
    async def note(self, event: StoredEvent) -> None:
        self.seen.append(event.payload)


async def test_typed_handlers_get_decoded_events(backend: Backend) -> None:
    store = EventStore(backend)
    await store.stream(category="orders", stream="o-1").publish(
        [
            placed(),
            OrderPaid(OrderId("o-1"), Decimal("20.25")),
            NewEvent(name="note", payload={"n": 1}),
            NewEvent(name="order-refunded"),
        ]
    )
    projections = ProjectionStore(backend, PlacedTotals.name)
    collector = Collector()
    for group, processor in (
        ("totals", ProjectionProcessor(PlacedTotals(), projections)),
        ("collector", collector),
    ):
        subscriber = make_subscriber(
            backend, group=group, sources=CategoryIdentifier("orders"), processor=processor
        )
        await subscriber.accept(CategoryIdentifier("orders"), 1)
        assert await subscriber.consume_all() == 4
    projection = await projections.get("o-1")
    assert projection is not None
    assert projection.state == {
        "total": "20.25",
        "currency": "CHF",
        "paid": "20.25",
        "refunded": True,
    }
    assert collector.seen == [OrderPaid(OrderId("o-1"), Decimal("20.25")), {"n": 1}]


def test_handler_processors_need_async_handlers() -> None:
    with pytest.raises(InvalidSettingsError, match="async def"):

        class Sync(HandlerProcessor):
            @handles("a")
            def a(self, event: StoredEvent) -> None:
                pass


models = EventTypes()


@models.event("customer-renamed", version=2)
class CustomerRenamed(pydantic.BaseModel):
    """A pydantic model through the model protocol."""

    customer: UUID
    name: str
    at: datetime

    def to_payload(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_payload(cls, payload: JsonObject) -> CustomerRenamed:
        return cls.model_validate(payload)


@models.upcaster("customer-renamed", from_version=1)
def split_name(payload: JsonObject) -> JsonObject:
    return {**payload, "name": f"{payload.pop('first')} {payload.pop('last')}"}


@models.event("customer-moved")
class CustomerMoved(msgspec.Struct, frozen=True):
    """A msgspec Struct through the model protocol."""

    customer: UUID
    city: str
    since: datetime

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = msgspec.to_builtins(self)
        return payload

    @classmethod
    def from_payload(cls, payload: JsonObject) -> CustomerMoved:
        return msgspec.convert(payload, cls)


async def test_pydantic_and_msgspec_models_round_trip(backend: Backend) -> None:
    store = EventStore(backend)
    customer = uuid4()
    at = datetime(2024, 3, 1, 12, tzinfo=UTC)
    renamed = CustomerRenamed(customer=customer, name="Ann Lee", at=at)
    moved = CustomerMoved(customer=customer, city="Bern", since=at)
    stream = store.stream(category="customers", stream=str(customer))
    old: JsonObject = {
        "customer": str(customer),
        "first": "Ann",
        "last": "Smith",
        "at": at.isoformat(),
    }
    await stream.publish([renamed, moved, NewEvent(name="customer-renamed", payload=old)])
    first, second, third = await stream.read()
    assert models.decode(first) == renamed
    assert models.decode(second) == moved
    assert models.decode_as(third, CustomerRenamed).name == "Ann Smith"
    with pytest.raises(EventDecodingError, match="customer-renamed"):
        models.decode(stored("customer-renamed", {"customer": "nope"}, {VERSION_KEY: 2}))

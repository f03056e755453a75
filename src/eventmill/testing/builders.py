"""Builders for events in tests: sensible random defaults, override what matters.

::

    event = NewEventBuilder().with_name("order-placed").with_payload({"total": 3}).build()
    stored = StoredEventBuilder(category="orders").with_position(4).build()
    batch = random_events(10, seed=7)

Builders are immutable: every ``with_*`` returns a new builder. A ``seed`` makes the
random parts repeatable.
"""

from __future__ import annotations

import dataclasses
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Self

from eventmill.events import JsonObject, NewEvent, StoredEvent

_WORDS = ["order", "item", "payment", "shipment", "customer", "invoice", "refund", "cart"]
_VERBS = ["placed", "added", "removed", "paid", "shipped", "cancelled", "updated"]


def random_name(rng: random.Random) -> str:
    """A readable random event name such as ``order-placed``."""
    return f"{rng.choice(_WORDS)}-{rng.choice(_VERBS)}"


def random_payload(rng: random.Random, depth: int = 2) -> JsonObject:
    """A random JSON object of a few keys, nested up to ``depth``."""
    payload: JsonObject = {}
    for index in range(rng.randint(0, 4)):
        key = f"{rng.choice(_WORDS)}_{index}"
        kind = rng.randint(0, 5 if depth > 0 else 3)
        if kind == 0:
            payload[key] = rng.randint(-(10**6), 10**6)
        elif kind == 1:
            payload[key] = round(rng.uniform(-1000, 1000), 3)
        elif kind == 2:
            payload[key] = rng.choice(_WORDS) + " " + rng.choice(_VERBS)
        elif kind == 3:
            payload[key] = rng.choice([True, False, None])
        elif kind == 4:
            payload[key] = [rng.randint(0, 9) for _ in range(rng.randint(0, 3))]
        else:
            payload[key] = random_payload(rng, depth - 1)
    return payload


def _random_time(rng: random.Random) -> datetime:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    return start + timedelta(seconds=rng.randint(0, 3 * 365 * 24 * 3600))


@dataclasses.dataclass(frozen=True, slots=True)
class NewEventBuilder:
    """Builds ``NewEvent``s; unset fields are random (repeatable with ``seed``)."""

    seed: int | None = None
    name: str | None = None
    payload: JsonObject | None = None
    metadata: JsonObject | None = None
    occurred_at: datetime | None = None

    def with_name(self, name: str) -> Self:
        return dataclasses.replace(self, name=name)

    def with_payload(self, payload: JsonObject) -> Self:
        return dataclasses.replace(self, payload=payload)

    def with_metadata(self, metadata: JsonObject) -> Self:
        return dataclasses.replace(self, metadata=metadata)

    def with_occurred_at(self, occurred_at: datetime) -> Self:
        return dataclasses.replace(self, occurred_at=occurred_at)

    def build(self) -> NewEvent:
        """A new event. Raises InvalidEventError if an override is invalid."""
        rng = random.Random(self.seed)
        return NewEvent(
            name=self.name if self.name is not None else random_name(rng),
            payload=self.payload if self.payload is not None else random_payload(rng),
            metadata=self.metadata if self.metadata is not None else {},
            occurred_at=self.occurred_at if self.occurred_at is not None else _random_time(rng),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class StoredEventBuilder:
    """Builds ``StoredEvent``s for tests of processors and projections, without a store."""

    seed: int | None = None
    category: str = "category"
    stream: str = "stream"
    position: int = 0
    sequence_number: int = 1
    name: str | None = None
    payload: JsonObject | None = None
    metadata: JsonObject | None = None

    def with_name(self, name: str) -> Self:
        return dataclasses.replace(self, name=name)

    def with_payload(self, payload: JsonObject) -> Self:
        return dataclasses.replace(self, payload=payload)

    def with_stream(self, category: str, stream: str) -> Self:
        return dataclasses.replace(self, category=category, stream=stream)

    def with_position(self, position: int, sequence_number: int | None = None) -> Self:
        number = sequence_number if sequence_number is not None else position + 1
        return dataclasses.replace(self, position=position, sequence_number=number)

    def build(self) -> StoredEvent:
        """A stored event; its name, payload and metadata are validated like a NewEvent's."""
        rng = random.Random(self.seed)
        new = NewEventBuilder(
            seed=self.seed, name=self.name, payload=self.payload, metadata=self.metadata
        ).build()
        return StoredEvent(
            id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            name=new.name,
            category=self.category,
            stream=self.stream,
            position=self.position,
            sequence_number=self.sequence_number,
            payload=new.payload,
            metadata=new.metadata,
            occurred_at=new.occurred_at,
            observed_at=new.occurred_at,
        )


def random_events(count: int, *, seed: int | None = None, **fixed: Any) -> list[NewEvent]:
    """``count`` random new events; ``fixed`` (name=, payload=, ...) overrides fields."""
    rng = random.Random(seed)
    return [
        dataclasses.replace(NewEventBuilder(seed=rng.getrandbits(64)), **fixed).build()
        for _ in range(count)
    ]

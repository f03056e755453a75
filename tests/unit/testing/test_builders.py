from __future__ import annotations

import pytest

from eventmill import InvalidEventError, NewEvent
from eventmill.testing import NewEventBuilder, StoredEventBuilder, random_events


def test_builders_are_repeatable_with_a_seed_and_random_without() -> None:
    assert NewEventBuilder(seed=3).build() == NewEventBuilder(seed=3).build()
    assert random_events(5, seed=1) == random_events(5, seed=1)
    assert len({event.payload.__repr__() for event in random_events(50)}) > 1


def test_overrides_win_and_are_validated() -> None:
    event = NewEventBuilder(seed=1).with_name("placed").with_payload({"a": 1}).build()
    assert (event.name, event.payload) == ("placed", {"a": 1})
    assert all(e.name == "fixed" for e in random_events(3, name="fixed"))
    with pytest.raises(InvalidEventError):
        NewEventBuilder().with_payload({"bad": {1, 2}}).build()  # type: ignore[dict-item]


def test_stored_event_builder_places_events() -> None:
    stored = StoredEventBuilder(seed=2).with_stream("orders", "o-1").with_position(4).build()
    assert (stored.category, stored.stream, stored.position, stored.sequence_number) == (
        "orders",
        "o-1",
        4,
        5,
    )
    assert isinstance(NewEvent(name=stored.name, payload=stored.payload), NewEvent)

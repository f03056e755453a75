"""Events built from arbitrary input either publish and read back identical, or are
refused with InvalidEventError before anything is written, on every backend."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from eventmill import (
    EventStore,
    InvalidEventError,
    NewEvent,
    UnmetWriteConditionError,
    position_is,
)
from eventmill.backends.base import Backend
from eventmill.events import JsonObject
from tests.fuzz.json_equality import canonical
from tests.fuzz.log_checks import wait_for_log_length
from tests.fuzz.strategies import (
    any_names,
    any_object_ish,
    not_json_leaves,
    storable_json,
    storable_objects,
    storable_text,
)

ON_BACKEND = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

any_times = st.one_of(
    st.datetimes(timezones=st.timezones()),
    st.datetimes(
        timezones=st.builds(
            timezone, st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23))
        )
    ),
    st.datetimes(),  # naive
    st.sampled_from([None, "2024-01-01T00:00:00Z", 0, 1.5]),
)


def build(name: object, payload: object, metadata: object, occurred_at: object) -> NewEvent:
    """NewEvent from arbitrary values (the type checker would refuse most of them)."""
    arguments: dict[str, Any] = {"name": name, "payload": payload, "metadata": metadata}
    arguments["occurred_at"] = occurred_at
    return NewEvent(**arguments)


def assert_same(read: Any, new: NewEvent) -> None:
    assert read.name == new.name
    assert canonical(read.payload) == canonical(new.payload)
    assert canonical(read.metadata) == canonical(new.metadata)
    assert read.occurred_at == new.occurred_at


@given(payload=any_object_ish, metadata=any_object_ish, name=any_names, occurred_at=any_times)
@settings(max_examples=400, deadline=None)
def test_any_input_builds_an_event_or_raises_invalid_event_error(
    payload: object, metadata: object, name: object, occurred_at: object
) -> None:
    try:
        event = build(name, payload, metadata, occurred_at)
    except InvalidEventError:
        return
    assert canonical(event.payload) == canonical(payload)
    assert canonical(event.metadata) == canonical(metadata)
    assert event.occurred_at.tzinfo is UTC
    # The same instant. Compared through UTC: Python's == across zones is False for a
    # local time in a zone's gap or fold (PEP 495), though the instant is kept.
    assert isinstance(occurred_at, datetime)
    assert event.occurred_at == occurred_at.astimezone(UTC)
    assert event.occurred_at.utcoffset() == timedelta(0)


@given(
    good=storable_objects,
    bad=not_json_leaves,
    path=st.lists(st.sampled_from(["list", "dict"]), max_size=4),
    key=storable_text,
)
@settings(max_examples=200, deadline=None)
def test_a_bad_value_anywhere_is_refused(
    good: dict[str, Any], bad: object, path: list[str], key: str
) -> None:
    value: Any = bad
    for kind in reversed(path):
        value = [value] if kind == "list" else {key: value}
    with pytest.raises(InvalidEventError):
        build("e", {**good, key: value}, {}, datetime.now(UTC))
    with pytest.raises(InvalidEventError):
        build("e", {}, {**good, key: value}, datetime.now(UTC))


@given(payload=storable_objects, metadata=storable_objects, data=st.data())
@ON_BACKEND
async def test_storable_events_read_back_identical(
    backend: Backend, payload: dict[str, Any], metadata: dict[str, Any], data: st.DataObject
) -> None:
    store = EventStore(backend)
    occurred_at = data.draw(st.datetimes(timezones=st.timezones()))
    try:
        new = NewEvent(name="e", payload=payload, metadata=metadata, occurred_at=occurred_at)
    except InvalidEventError:
        # Only times that fall outside years 1 to 9999 in UTC may be refused.
        assume(False)
    stream = store.stream(category="fuzz", stream=str(uuid.uuid4()))
    [published] = await stream.publish([new])
    assert_same(published, new)
    [read] = await stream.read()
    assert_same(read, new)
    assert read.sequence_number == published.sequence_number


async def test_arbitrary_input_is_stored_identically_or_nothing_is_written(
    backend: Backend,
) -> None:
    """Hypothesis draws the inputs; the ones that make events are then published."""
    store = EventStore(backend)
    built: list[NewEvent] = []

    @given(payload=any_object_ish, metadata=any_object_ish, name=any_names)
    @settings(max_examples=150, deadline=None)
    def attempt(payload: object, metadata: object, name: object) -> None:
        try:
            built.append(build(name, payload, metadata, datetime.now(UTC)))
        except InvalidEventError:
            return

    attempt()
    for number, event in enumerate(built):
        stream = store.stream(category="fuzz", stream=f"s{number}")
        await stream.publish([event])
        [read] = await stream.read()
        assert_same(read, event)
    log = await wait_for_log_length(store, len(built))
    for read, event in zip(log, built, strict=True):
        assert_same(read, event)


@given(
    good=st.lists(storable_objects, min_size=1, max_size=5),
    bad=st.sampled_from([None, {"name": "e"}, "e", 1, NewEvent, [NewEvent(name="e")]]),
    data=st.data(),
)
@ON_BACKEND
async def test_a_batch_with_one_bad_item_writes_nothing(
    backend: Backend, good: list[dict[str, Any]], bad: object, data: st.DataObject
) -> None:
    store = EventStore(backend)
    batch: list[Any] = [NewEvent(name="e", payload=payload) for payload in good]
    batch.insert(data.draw(st.integers(0, len(batch))), bad)
    with pytest.raises(InvalidEventError):
        await store.stream(category="fuzz", stream="batch").publish(batch)
    assert await store.stream(category="fuzz", stream="batch").read() == []
    assert await store.log().read() == []


@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4), payload=storable_json)
@ON_BACKEND
async def test_a_batch_refused_by_its_condition_writes_none_of_its_events(
    backend: Backend, sizes: list[int], payload: Any
) -> None:
    store = EventStore(backend)
    stream = store.stream(category="fuzz", stream="conditions")
    before = await stream.read()
    for size in sizes:
        batch = [NewEvent(name="e", payload={"v": payload}) for _ in range(size)]
        with pytest.raises(UnmetWriteConditionError):
            await stream.publish(batch, condition=position_is(len(before) + 1000))
    assert await stream.read() == before


@pytest.mark.parametrize(
    "value",
    [1e16, -1e16, 1e308, -1.7976931348623157e308, 1.2345678901234567e25, 3.0e20],
)
async def test_large_floats_read_back_as_floats(backend: Backend, value: float) -> None:
    """PostgreSQL ``jsonb`` stores numbers as decimals with the scale they are written
    with; floats of 1e16 or more are written with a ``.0`` so they read back as floats."""
    store = EventStore(backend)
    stream = store.stream(category="fuzz", stream="floats")
    payload: JsonObject = {"v": value, "nested": [{"w": value}], "text": "see e+ here"}
    await stream.publish([NewEvent(name="e", payload=payload)])
    [read] = await stream.read()
    assert read.payload == payload
    assert type(read.payload["v"]) is float


@pytest.mark.parametrize(
    "occurred_at",
    [
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=5, seconds=15, microseconds=7))),
        datetime(2024, 3, 31, 2, 30, tzinfo=timezone(timedelta(hours=-23, minutes=-59))),
    ],
)
async def test_extreme_times_read_back_equal(backend: Backend, occurred_at: datetime) -> None:
    store = EventStore(backend)
    stream = store.stream(category="fuzz", stream="times")
    new = NewEvent(name="e", occurred_at=occurred_at)
    await stream.publish([new])
    [read] = await stream.read()
    assert read.occurred_at == occurred_at


@pytest.mark.parametrize(
    "occurred_at",
    [
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))),
        datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5))),
    ],
)
def test_times_outside_utc_years_1_to_9999_are_refused(occurred_at: datetime) -> None:
    with pytest.raises(InvalidEventError, match="years 1 to 9999"):
        NewEvent(name="e", occurred_at=occurred_at)


def test_nan_inside_a_list_is_refused() -> None:
    with pytest.raises(InvalidEventError, match="NaN"):
        NewEvent(name="e", payload={"v": [1.0, math.nan]})

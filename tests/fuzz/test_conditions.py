"""Write conditions built from arbitrary combinations agree with ``is_met_by`` when
publishing on every backend; a refused publish writes nothing; bad arguments are
refused with InvalidInputError."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventmill import (
    EventStore,
    InvalidInputError,
    NewEvent,
    UnmetWriteConditionError,
    WriteCondition,
    position_is,
    stream_is_empty,
)
from eventmill.backends.base import Backend
from eventmill.conditions import MAX_POSITION
from tests.fuzz.strategies import huge_ints

conditions = st.recursive(
    st.just(stream_is_empty()) | st.integers(0, 6).map(position_is),
    lambda children: (
        st.builds(lambda a, b: a & b, children, children)
        | st.builds(lambda a, b: a | b, children, children)
    ),
    max_leaves=6,
)
not_positions = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=MAX_POSITION + 1),
    huge_ints,
    st.booleans(),
    st.floats(),
    st.text(max_size=3),
    st.none(),
    st.just(Decimal(1)),
    st.just([1]),
)


@given(condition=conditions, length=st.integers(0, 6), batch=st.integers(1, 3))
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
async def test_publishing_under_a_condition_agrees_with_is_met_by(
    backend: Backend, condition: WriteCondition, length: int, batch: int
) -> None:
    store = EventStore(backend)
    # A stream of its own per example: the condition's description and a counter.
    stream = store.stream(category="conditions", stream=f"{next(_numbers)}:{condition}")
    if length:
        await stream.publish([NewEvent(name="before") for _ in range(length)])
    latest = length - 1 if length else None
    events = [NewEvent(name="under-condition") for _ in range(batch)]
    if condition.is_met_by(latest):
        stored = await stream.publish(events, condition=condition)
        assert [event.position for event in stored] == list(range(length, length + batch))
    else:
        with pytest.raises(UnmetWriteConditionError) as refused:
            await stream.publish(events, condition=condition)
        assert refused.value.found == latest
        assert refused.value.expected == condition
    read = await stream.read()
    expected_length = length + (batch if condition.is_met_by(latest) else 0)
    assert [event.position for event in read] == list(range(expected_length))
    assert all(event.name == "before" for event in read[:length])


_numbers = iter(range(1_000_000_000))


@given(value=not_positions)
def test_position_is_refuses_what_is_not_a_position(value: Any) -> None:
    with pytest.raises(InvalidInputError):
        position_is(value)


@given(
    allowed=st.frozensets(not_positions.filter(lambda v: v is not None and v != [1]), min_size=1)
)
def test_write_condition_refuses_what_is_not_a_position(allowed: frozenset[Any]) -> None:
    with pytest.raises(InvalidInputError):
        WriteCondition(allowed | {None}, "made by hand")


@given(value=st.one_of(st.integers(), st.text(), st.just(stream_is_empty), st.just([None])))
async def test_publish_refuses_what_is_not_a_condition(value: Any) -> None:
    from eventmill.backends.memory import InMemoryBackend

    store = EventStore(InMemoryBackend())
    with pytest.raises(InvalidInputError):
        await store.stream(category="c", stream="s").publish([NewEvent(name="e")], condition=value)
    assert await store.log().read() == []


def test_the_largest_position_is_a_valid_condition() -> None:
    assert position_is(MAX_POSITION).is_met_by(MAX_POSITION)

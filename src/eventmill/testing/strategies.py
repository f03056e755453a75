"""Hypothesis strategies for events (needs the ``testing`` extra: hypothesis).

::

    from hypothesis import given
    from eventmill.testing.strategies import new_events, typed_events

    @given(new_events(names=["order-placed"]))
    def test_anything(event: NewEvent) -> None: ...

    @given(typed_events(OrderPlaced))       # a registered dataclass: aware datetimes
    def test_typed(event: OrderPlaced) -> None: ...

Everything drawn is storable: it publishes and reads back equal on every backend.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, TypeVar

from hypothesis import strategies as st

from eventmill.encoding import field_types
from eventmill.events import JsonObject, JsonValue, NewEvent

T = TypeVar("T")

STORABLE_FLOAT_LIMIT = 1e16
"""Floats from here on read back from PostgreSQL ``jsonb`` as ints in dict payloads."""

text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
"""Strings eventmill stores: no NUL, no unpaired surrogate."""


def json_values(max_leaves: int = 10) -> st.SearchStrategy[JsonValue]:
    """JSON values that round-trip through every backend."""
    leaves = (
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63)
        | st.floats(
            min_value=-STORABLE_FLOAT_LIMIT,
            max_value=STORABLE_FLOAT_LIMIT,
            exclude_min=True,
            exclude_max=True,
        )
        | text
    )
    return st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def json_objects(max_size: int = 5) -> st.SearchStrategy[JsonObject]:
    """JSON objects (payloads, metadata) that round-trip through every backend."""
    return st.dictionaries(text, json_values(), max_size=max_size)


aware_datetimes = st.datetimes(
    min_value=datetime(2, 1, 1),
    max_value=datetime(9998, 12, 31),
    timezones=st.just(UTC)
    | st.integers(-86399, 86399).map(lambda seconds: timezone(timedelta(seconds=seconds))),
).map(lambda value: value.replace(fold=0))
"""Timezone-aware datetimes at fixed offsets, as typed events store them."""


def new_events(names: Sequence[str] | None = None) -> st.SearchStrategy[NewEvent]:
    """NewEvents with storable payloads and metadata, named from ``names`` if given."""
    return st.builds(
        NewEvent,
        name=st.sampled_from(list(names))
        if names
        else text.filter(lambda name: 0 < len(name) < 256),
        payload=json_objects(),
        metadata=json_objects(),
        occurred_at=st.datetimes(
            min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=st.just(UTC)
        ),
    )


def typed_events(cls: type[T]) -> st.SearchStrategy[T]:
    """Instances of the dataclass ``cls``; ``datetime`` fields (at any depth) are aware,
    as encoding requires, ``str`` fields hold storable text, floats and Decimals are
    finite; other fields come from ``hypothesis.strategies.from_type``."""
    return _for(cls)


def _for(annotation: Any) -> st.SearchStrategy[Any]:
    if annotation is datetime:
        return aware_datetimes
    if annotation is str:
        return text
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return st.builds(
            annotation,
            **{name: _for(kind) for name, (kind, _) in field_types(annotation).items()},
        )
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin in (list, Sequence) and arguments:
        return st.lists(_for(arguments[0]), max_size=3)
    if origin is tuple and len(arguments) == 2 and arguments[1] is ...:
        return st.lists(_for(arguments[0]), max_size=3).map(tuple)
    if origin is tuple and arguments:
        return st.tuples(*(_for(argument) for argument in arguments))
    if origin is dict and arguments:
        return st.dictionaries(_for(arguments[0]), _for(arguments[1]), max_size=3)
    if origin is typing.Union or origin is types.UnionType:
        return st.one_of(*(_for(argument) for argument in arguments))
    if annotation is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if annotation is Decimal:
        return st.decimals(allow_nan=False, allow_infinity=False)
    return st.from_type(annotation)

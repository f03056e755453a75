"""identifier_from_json over arbitrary values returns an identifier that round-trips, or
raises InvalidIdentifierError, never anything else."""

from __future__ import annotations

import json
from collections import OrderedDict
from types import MappingProxyType
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from eventmill import InvalidIdentifierError, identifier_from_json
from eventmill.events import source_key
from tests.fuzz.strategies import any_json_ish, any_names, huge_ints

field_values = st.one_of(
    any_names,
    st.integers(min_value=-3, max_value=1030),
    huge_ints,
    st.booleans(),
    st.floats(),
    any_json_ish,
)
identifier_shaped = st.fixed_dictionaries(
    {"type": st.sampled_from(["log", "category", "stream", "category-partition"]) | any_json_ish},
    optional={
        "category": field_values,
        "stream": field_values,
        "partition": field_values,
        "partitions": field_values,
        "extra": field_values,
    },
)
mappings_and_others = st.one_of(
    identifier_shaped,
    identifier_shaped.map(OrderedDict),
    identifier_shaped.map(MappingProxyType),
    st.dictionaries(
        st.one_of(st.text(), st.integers(), st.none(), st.tuples(st.text()), huge_ints),
        any_json_ish,
        max_size=4,
    ),
    any_json_ish,
    st.builds(object),
)


@given(value=mappings_and_others)
@settings(max_examples=600, deadline=None)
def test_identifier_from_json_round_trips_or_refuses(value: Any) -> None:
    try:
        identifier = identifier_from_json(value)
    except InvalidIdentifierError:
        return
    serialised = identifier.to_json()
    assert identifier_from_json(serialised) == identifier
    assert identifier_from_json(json.loads(json.dumps(serialised))) == identifier
    assert json.loads(source_key(identifier)) == serialised
    assert hash(identifier) == hash(identifier_from_json(serialised))

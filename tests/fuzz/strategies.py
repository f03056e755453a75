"""Hypothesis strategies for bad-input fuzzing: JSON values that must round-trip, values
that are almost JSON (and must be refused), and names full of quoting hazards."""

from __future__ import annotations

import enum
from collections import OrderedDict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st

from eventmill.events import MAX_INT_BITS, MAX_JSON_DEPTH, MAX_NAME_LENGTH

STORABLE_FLOAT_LIMIT = 1e16
"""Floats at least this large read back from PostgreSQL ``jsonb`` as ints (see
test_events.py), so the round-trip strategies stay below it."""

storable_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))

storable_json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(1, MAX_INT_BITS).flatmap(lambda bits: st.integers(-(2**bits) + 1, 2**bits - 1))
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(
        min_value=-STORABLE_FLOAT_LIMIT,
        max_value=STORABLE_FLOAT_LIMIT,
        exclude_min=True,
        exclude_max=True,
    )
    | storable_text
)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=4) | st.dictionaries(storable_text, children, max_size=4)


storable_json = st.recursive(storable_json_leaves, _containers, max_leaves=12)
storable_objects = st.dictionaries(storable_text, storable_json, max_size=5)


class _Colour(enum.IntEnum):
    RED = 1


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


def nested(depth: int) -> Any:
    """A list nested ``depth`` lists deep around 0."""
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


huge_ints = st.integers(4400, 6000).map(lambda digits: 10**digits)
"""Ints too long even for ``repr`` (Python refuses to print more than 4300 digits)."""

# Values that are not JSON as eventmill accepts it; a few may be wrapped into valid
# containers by ``almost_json`` below, so a whole payload fails at any depth.
not_json_leaves = st.one_of(
    st.sampled_from(
        [
            float("nan"),
            float("inf"),
            float("-inf"),
            b"bytes",
            bytearray(b"x"),
            {1, 2},
            frozenset(),
            (1, 2),
            (),
            Decimal("1.5"),
            datetime(2024, 1, 1, tzinfo=UTC),
            _Colour.RED,
            _Opaque(),
            OrderedDict(a=1),
            "nul\x00inside",
            "lone \ud800 surrogate",
            "\udfff",
            {1: "int key"},
            {None: "none key"},
            {(1, 2): "tuple key"},
            {True: "bool key"},
            {"nul\x00key": 1},
            {"\ud800": 1},
            complex(1, 2),
            range(3),
            ...,
            type,
        ]
    ),
    st.integers(min_value=MAX_JSON_DEPTH, max_value=MAX_JSON_DEPTH + 50).map(nested),
    st.integers(MAX_INT_BITS, MAX_INT_BITS + 8).map(lambda bits: 2**bits),
    st.integers(MAX_INT_BITS, MAX_INT_BITS + 8).map(lambda bits: -(2**bits)),
    huge_ints,
    huge_ints.map(lambda number: {number: "huge int key"}),
)


def _wrap_bad(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(children, max_size=3)
        | st.dictionaries(storable_text, children, max_size=3)
        | st.tuples(children)
    )


# A mix of good and bad leaves at any depth: each value is either storable JSON or not.
any_json_ish = st.recursive(storable_json_leaves | not_json_leaves, _wrap_bad, max_leaves=10)
any_object_ish = st.dictionaries(storable_text, any_json_ish, max_size=4) | any_json_ish


HAZARDS = [
    "'",
    '"',
    ";",
    "\\",
    "$$",
    "$1",
    "%s",
    "%(x)s",
    "%%",
    "{schema}",
    "{}",
    "{0}",
    "--",
    "/*",
    "*/",
    "'); DROP TABLE events; --",
    '" OR 1=1 --',
    "E'\\x41'",
    "\\u0000",
    "ß",
    "Ω",
    "日本",
    "🦆",
    "\u200b",
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    " ",
    "\t",
    "\n",
    "\r\n",
    ",",
    "/",
    ":",
    "*",
    "_",
    "%",
]

hazardous_names = st.one_of(
    st.lists(st.sampled_from(HAZARDS) | storable_text, min_size=1, max_size=6)
    .map(lambda parts: "".join(parts)[:MAX_NAME_LENGTH])
    .filter(bool),
    st.sampled_from(HAZARDS),
    st.sampled_from(["x", "'", "日", "🦆"]).map(lambda text: text * MAX_NAME_LENGTH),
)
"""Valid names (non-empty, at most MAX_NAME_LENGTH characters) full of hazards."""

any_names = st.one_of(
    hazardous_names,
    st.just(""),
    st.just(MAX_NAME_LENGTH + 1).map(lambda length: "x" * length),
    st.just("a\x00b"),
    st.just("\ud800"),
    st.none(),
    st.integers(),
    st.binary(max_size=4),
    st.tuples(st.text()),
)

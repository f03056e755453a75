"""Events and the identifiers of event sources.

``NewEvent`` is what you publish; ``StoredEvent`` is what the store gives back. Both
are immutable. Identifiers name what can be read in order: the whole log, a category,
a stream, or one partition of a category. They are frozen, hashable, and round-trip
through JSON (``to_json()`` / ``identifier_from_json()``).

Validation happens here, at construction, so a bad event fails before anything is
written: names are non-empty strings of at most ``MAX_NAME_LENGTH`` characters with no
NUL or unpaired surrogate; payload and metadata are JSON objects made of ``dict`` (with
``str`` keys), ``list``, ``str``, ``int`` (below ``2**MAX_INT_BITS`` in size), finite
``float``, ``bool`` and ``None``, nested at most ``MAX_JSON_DEPTH`` containers deep.
``occurred_at`` must be timezone-aware and is kept in UTC (the same instant), within
years 1 to 9999 there.
A payload is copied when the event is made, so changing your dict afterwards does not
change what is stored. Payloads read back are plain dicts; treat them as read-only.
"""

from __future__ import annotations

import json
import math
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeAlias

from eventmill.errors import InvalidEventError, InvalidIdentifierError, describe

JsonValue: TypeAlias = bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"] | None
JsonObject: TypeAlias = dict[str, JsonValue]

MAX_NAME_LENGTH = 255
MAX_JSON_DEPTH = 100
"""How many lists and objects deep a payload or metadata may nest."""
MAX_INT_BITS = 4096
"""JSON integers must be below ``2**MAX_INT_BITS`` in absolute value (text and PostgreSQL
``jsonb`` round trips stay exact and cheap)."""


def _text_problem(value: object) -> str | None:
    """Why ``value`` cannot be stored as text, or ``None`` when it can."""
    if not isinstance(value, str):
        return f"must be a str, not {type(value).__name__}"
    if "\x00" in value:
        return "must not contain NUL characters"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must be valid unicode (no unpaired surrogates)"
    return None


def check_name(value: object, what: str, error: type[Exception] = InvalidIdentifierError) -> str:
    """Return ``value`` if it is a usable name; raise ``error`` (an InvalidInputError) if not."""
    problem = _text_problem(value)
    if problem is None:
        assert isinstance(value, str)
        if not value:
            problem = "must not be empty"
        elif len(value) > MAX_NAME_LENGTH:
            problem = f"must be at most {MAX_NAME_LENGTH} characters, not {len(value)}"
        else:
            return value
    raise error(f"{what} {problem}: {describe(value)}")


def _copy_json(value: Any, where: str, depth: int = 0) -> JsonValue:
    """A deep copy of ``value`` if it is JSON; raise InvalidEventError naming the place if not.

    ``depth`` counts the lists and objects around ``value``.
    """
    if value is None or value is True or value is False:
        return value
    kind = type(value)
    if kind is str:
        problem = _text_problem(value)
        if problem is not None:
            raise InvalidEventError(f"{where}: a string {problem}")
        return value  # type: ignore[no-any-return]
    if kind is int:
        if value.bit_length() > MAX_INT_BITS:
            raise InvalidEventError(f"{where}: integers must be below 2**{MAX_INT_BITS} in size")
        return value  # type: ignore[no-any-return]
    if kind is float:
        if not math.isfinite(value):
            raise InvalidEventError(
                f"{where}: {describe(value)} is not valid JSON (NaN or infinity)"
            )
        return value  # type: ignore[no-any-return]
    if (kind is dict or kind is list) and depth >= MAX_JSON_DEPTH:
        raise InvalidEventError(
            f"{where}: nested more than {MAX_JSON_DEPTH} lists and objects deep"
        )
    if kind is dict:
        copied: dict[str, JsonValue] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise InvalidEventError(
                    f"{where}: object keys must be str,"
                    f" not {type(key).__name__} ({describe(key, 40)})"
                )
            problem = _text_problem(key)
            if problem is not None:
                raise InvalidEventError(f"{where}: an object key {problem}")
            copied[key] = _copy_json(item, f"{where}.{key}", depth + 1)
        return copied
    if kind is list:
        return [_copy_json(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise InvalidEventError(
        f"{where}: {kind.__name__} is not JSON (use dict, list, str, int, float, bool or None)"
    )


def copy_json_object(value: object, where: str) -> JsonObject:
    """A deep copy of a JSON object (a dict with str keys); raise InvalidEventError if not."""
    if not isinstance(value, Mapping):
        raise InvalidEventError(f"{where} must be a JSON object (dict), not {type(value).__name__}")
    return _copy_json(dict(value), where)  # type: ignore[return-value]


def _utc_time(value: object, what: str) -> datetime:
    """``value`` as a UTC datetime; raise InvalidEventError if it is naive or out of range."""
    if not isinstance(value, datetime):
        raise InvalidEventError(f"{what} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidEventError(f"{what} must be timezone-aware: {describe(value)}")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise InvalidEventError(
            f"{what} is outside years 1 to 9999 in UTC: {describe(value)}"
        ) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class NewEvent:
    """An event to publish. Raises InvalidEventError at construction when invalid."""

    name: str
    payload: JsonObject = field(default_factory=dict)
    metadata: JsonObject = field(default_factory=dict)
    occurred_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        check_name(self.name, "event name", InvalidEventError)
        object.__setattr__(self, "payload", copy_json_object(self.payload, "payload"))
        object.__setattr__(self, "metadata", copy_json_object(self.metadata, "metadata"))
        object.__setattr__(self, "occurred_at", _utc_time(self.occurred_at, "occurred_at"))


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredEvent:
    """An event as stored: its place in its stream (``position``, from 0, no gaps) and in
    the log (``sequence_number``, increasing, gaps allowed), and when the store saw it."""

    id: str
    name: str
    category: str
    stream: str
    position: int
    sequence_number: int
    payload: JsonObject
    metadata: JsonObject
    occurred_at: datetime
    observed_at: datetime


def new_event_id() -> str:
    """A fresh event id (a random UUID as text)."""
    return str(uuid.uuid4())


def stream_hash(stream: str) -> int:
    """A stable hash of a stream name, the same in every process and Python version."""
    return zlib.crc32(stream.encode("utf-8"))


PARTITION_BUCKETS = 64
"""Streams fall into this many fixed buckets, ``stream_hash(stream) % PARTITION_BUCKETS``;
a partition is a set of whole buckets, which storage indexes (see
CategoryPartitionIdentifier)."""


def stream_bucket(stream: str) -> int:
    """The bucket of a stream, 0 to ``PARTITION_BUCKETS - 1``."""
    return stream_hash(stream) % PARTITION_BUCKETS


@dataclass(frozen=True, slots=True)
class LogIdentifier:
    """Every event in the store, in sequence-number order."""

    def to_json(self) -> JsonObject:
        return {"type": "log"}

    def __str__(self) -> str:
        return "log"


@dataclass(frozen=True, slots=True)
class CategoryIdentifier:
    """Every event of one category, in sequence-number order."""

    category: str

    def __post_init__(self) -> None:
        check_name(self.category, "category")

    def to_json(self) -> JsonObject:
        return {"type": "category", "category": self.category}

    def __str__(self) -> str:
        return f"category:{self.category}"


@dataclass(frozen=True, slots=True)
class StreamIdentifier:
    """Every event of one stream, in position order."""

    category: str
    stream: str

    def __post_init__(self) -> None:
        check_name(self.category, "category")
        check_name(self.stream, "stream")

    def to_json(self) -> JsonObject:
        return {"type": "stream", "category": self.category, "stream": self.stream}

    def __str__(self) -> str:
        return f"stream:{self.category}/{self.stream}"


@dataclass(frozen=True, slots=True)
class CategoryPartitionIdentifier:
    """The events of the streams of a category whose ``stream_hash(stream) % partitions``
    equals ``partition``, in sequence-number order. A stream's events share one partition.

    ``partitions`` is a power of two from 1 to ``PARTITION_BUCKETS`` (64). Then a
    partition is exactly the buckets ``partition, partition + partitions, ...`` (see
    ``buckets``), so storage reads it as a merge of a few indexed, ordered bucket scans
    and a read costs what it returns. Raises InvalidIdentifierError otherwise.
    """

    category: str
    partition: int
    partitions: int

    def __post_init__(self) -> None:
        check_name(self.category, "category")
        for what, value in (("partition", self.partition), ("partitions", self.partitions)):
            if type(value) is not int:
                raise InvalidIdentifierError(f"{what} must be an int, not {type(value).__name__}")
        count = self.partitions
        if not 1 <= count <= PARTITION_BUCKETS or count & (count - 1):
            raise InvalidIdentifierError(
                f"partitions must be a power of two from 1 to {PARTITION_BUCKETS} "
                f"(1, 2, 4, ...), not {count}"
            )
        if not 0 <= self.partition < self.partitions:
            raise InvalidIdentifierError(
                f"partition must be 0 to {self.partitions - 1}, not {self.partition}"
            )

    @property
    def buckets(self) -> range:
        """The stream buckets (``stream_bucket``) that make up this partition."""
        return range(self.partition, PARTITION_BUCKETS, self.partitions)

    def contains(self, stream: str) -> bool:
        return stream_hash(stream) % self.partitions == self.partition

    def to_json(self) -> JsonObject:
        return {
            "type": "category-partition",
            "category": self.category,
            "partition": self.partition,
            "partitions": self.partitions,
        }

    def __str__(self) -> str:
        return f"partition:{self.category}/{self.partition}of{self.partitions}"


EventSourceIdentifier: TypeAlias = (
    LogIdentifier | CategoryIdentifier | StreamIdentifier | CategoryPartitionIdentifier
)


def identifier_from_json(value: object) -> EventSourceIdentifier:
    """The identifier a ``to_json()`` produced. Raises InvalidIdentifierError otherwise."""
    if not isinstance(value, Mapping):
        raise InvalidIdentifierError(f"an identifier must be a JSON object, not {describe(value)}")
    data: Mapping[str, Any] = value
    kind = data.get("type")
    fields = {key: item for key, item in data.items() if key != "type"}
    expected: dict[object, tuple[type[EventSourceIdentifier], set[str]]] = {
        "log": (LogIdentifier, set()),
        "category": (CategoryIdentifier, {"category"}),
        "stream": (StreamIdentifier, {"category", "stream"}),
        "category-partition": (
            CategoryPartitionIdentifier,
            {"category", "partition", "partitions"},
        ),
    }
    if not isinstance(kind, str) or kind not in expected:
        raise InvalidIdentifierError(f"unknown identifier type {describe(kind)}")
    cls, names = expected[kind]
    if set(fields) != names:
        raise InvalidIdentifierError(
            f"a {kind} identifier has fields {sorted(names)}, not {sorted(map(str, fields))}"
        )
    return cls(**fields)


def check_identifier(value: object) -> EventSourceIdentifier:
    """Return ``value`` if it is an identifier; raise InvalidIdentifierError if not."""
    if isinstance(
        value, LogIdentifier | CategoryIdentifier | StreamIdentifier | CategoryPartitionIdentifier
    ):
        return value
    raise InvalidIdentifierError(f"not an event source identifier: {describe(value)}")


def source_key(identifier: EventSourceIdentifier) -> str:
    """The canonical text form of an identifier: its JSON with sorted keys, no spaces.

    Equal identifiers give equal keys; stores use it as the key of a source.
    """
    return json.dumps(identifier.to_json(), sort_keys=True, separators=(",", ":"))

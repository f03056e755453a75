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
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
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
    if (
        type(value) is str
        and 0 < len(value) <= MAX_NAME_LENGTH
        and value.isascii()
        and "\x00" not in value
    ):
        return value  # the usual case, checked without building anything
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


class _NotJson(Exception):
    """What is wrong with a value being copied, and (filled in on the way out) where."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.steps: list[str] = []  # innermost first: ".key", "[3]"


def _check_text(value: str, what: str) -> None:
    if "\x00" in value or not value.isascii():
        problem = _text_problem(value)
        if problem is not None:
            raise _NotJson(f"{what} {problem}")


def _copy_json(value: Any, depth: int) -> JsonValue:
    """A deep copy of ``value`` if it is JSON; raise _NotJson if not.

    ``depth`` counts the lists and objects around ``value``. The place of a problem is
    built only when there is one (``_NotJson.steps``): this walk runs for every event
    published, so it builds no strings on the way down.
    """
    kind = type(value)
    if kind is str:
        _check_text(value, "a string")
        return value  # type: ignore[no-any-return]
    if kind is int:
        if value.bit_length() > MAX_INT_BITS:
            raise _NotJson(f"integers must be below 2**{MAX_INT_BITS} in size")
        return value  # type: ignore[no-any-return]
    if value is None or kind is bool:
        return value  # type: ignore[no-any-return]
    if kind is float:
        if not math.isfinite(value):
            raise _NotJson(f"{describe(value)} is not valid JSON (NaN or infinity)")
        return value  # type: ignore[no-any-return]
    if kind is dict:
        return _copy_object(value, depth)
    if kind is list:
        if depth >= MAX_JSON_DEPTH:
            raise _NotJson(f"nested more than {MAX_JSON_DEPTH} lists and objects deep")
        copied_list: list[JsonValue] = []
        for index, item in enumerate(value):
            try:
                copied_list.append(_copy_json(item, depth + 1))
            except _NotJson as error:
                error.steps.append(f"[{index}]")
                raise
        return copied_list
    raise _NotJson(f"{kind.__name__} is not JSON (use dict, list, str, int, float, bool or None)")


def _copy_object(value: dict[Any, Any], depth: int) -> JsonObject:
    """``_copy_json`` of a dict (``copy_json_object`` calls it directly).

    It copies the dict whole (one C call) and then replaces only the values that are
    containers by their copies: strings and numbers are never set one by one.
    """
    if depth >= MAX_JSON_DEPTH:
        raise _NotJson(f"nested more than {MAX_JSON_DEPTH} lists and objects deep")
    copied: dict[str, JsonValue] = value.copy()
    for key, item in copied.items():
        if type(key) is not str:
            raise _NotJson(
                f"object keys must be str, not {type(key).__name__} ({describe(key, 40)})"
            )
        if "\x00" in key or not key.isascii():
            _check_text(key, "an object key")
        # Strings and small ints, most of what payloads hold, skip the call.
        if (type(item) is str and item.isascii() and "\x00" not in item) or (
            type(item) is int and -(2**62) < item < 2**62
        ):
            continue
        try:  # replacing the value of a key present does not change the dict's size
            copied[key] = _copy_json(item, depth + 1)
        except _NotJson as error:
            error.steps.append(f".{key}")
            raise
    return copied


def copy_json_object(value: object, where: str) -> JsonObject:
    """A deep copy of a JSON object (a dict with str keys); raise InvalidEventError if not,
    naming the place (``where`` and the keys and indexes down to the problem)."""
    if type(value) is not dict:
        if not isinstance(value, Mapping):
            raise InvalidEventError(
                f"{where} must be a JSON object (dict), not {type(value).__name__}"
            )
        value = dict(value)
    elif not value:
        return {}
    try:
        return _copy_object(value, 0)
    except _NotJson as error:
        place = where + "".join(reversed(error.steps))
        raise InvalidEventError(f"{place}: {error.problem}") from None


def _utc_time(value: object, what: str) -> datetime:
    """``value`` as a UTC datetime; raise InvalidEventError if it is naive or out of range."""
    if type(value) is datetime and value.tzinfo is UTC:
        return value
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


_DEFAULT: Any = object()
"""Stands for an argument not given (``None`` is a value to refuse, not a default)."""


@dataclass(frozen=True, slots=True, kw_only=True, init=False)
class NewEvent:
    """An event to publish. Raises InvalidEventError at construction when invalid.

    ``payload`` and ``metadata`` default to empty objects, ``occurred_at`` to now.
    """

    name: str
    payload: JsonObject
    metadata: JsonObject
    occurred_at: datetime

    # Written out rather than generated with a __post_init__: every published event is
    # made here, and setting each (frozen) field once, validated, halves the cost. The
    # fields are set through their slots' descriptors (below the class), not
    # ``object.__setattr__``, which looks each name up first.
    def __init__(
        self,
        *,
        name: str,
        payload: JsonObject = _DEFAULT,
        metadata: JsonObject = _DEFAULT,
        occurred_at: datetime = _DEFAULT,
    ) -> None:
        _set_new_name(self, check_name(name, "event name", InvalidEventError))
        _set_new_payload(self, {} if payload is _DEFAULT else copy_json_object(payload, "payload"))
        _set_new_metadata(
            self, {} if metadata is _DEFAULT else copy_json_object(metadata, "metadata")
        )
        _set_new_occurred_at(
            self,
            datetime.now(UTC) if occurred_at is _DEFAULT else _utc_time(occurred_at, "occurred_at"),
        )


_set_new_name, _set_new_payload, _set_new_metadata, _set_new_occurred_at = (
    getattr(NewEvent, field).__set__ for field in ("name", "payload", "metadata", "occurred_at")
)


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


_new_object = object.__new__


class _StoredEventSlots:
    """StoredEvent's slots in a class that is not frozen, so that Python code can fill
    them with plain (specialised, cheap) attribute stores; see ``stored_event``."""

    __slots__ = StoredEvent.__slots__


def stored_event(
    id: str,
    name: str,
    category: str,
    stream: str,
    position: int,
    sequence_number: int,
    payload: JsonObject,
    metadata: JsonObject,
    occurred_at: datetime,
    observed_at: datetime,
) -> StoredEvent:
    """A StoredEvent from values already checked, by position: what storage makes for
    every event it stores or reads. The same object as ``StoredEvent(...)`` at a sixth
    of the cost: 0.22 us against 1.3 (the generated frozen ``__init__`` sets each field
    through ``object.__setattr__``) and 0.52 (each slot set through its descriptor).
    A ``_StoredEventSlots``, whose memory layout is StoredEvent's (the same slots and
    nothing else), is filled and then made a StoredEvent by assigning its ``__class__``,
    which Python allows between classes of the same layout."""
    event: Any = _new_object(_StoredEventSlots)  # its slots are StoredEvent's fields
    event.id = id
    event.name = name
    event.category = category
    event.stream = stream
    event.position = position
    event.sequence_number = sequence_number
    event.payload = payload
    event.metadata = metadata
    event.occurred_at = occurred_at
    event.observed_at = observed_at
    event.__class__ = StoredEvent
    return event  # type: ignore[no-any-return]


def with_added_metadata(events: Sequence[NewEvent], added: Mapping[str, str]) -> list[NewEvent]:
    """Copies of ``events`` whose metadata also holds ``added`` (its keys replacing
    theirs). Only ``added`` is checked, once: each copy shares its event's name, payload
    and time, validated when that event was made (``NewEvent(...)`` would copy and check
    the whole payload again). Raises InvalidEventError if ``added`` is not a JSON object."""
    extra = copy_json_object(added, "metadata")
    copies: list[NewEvent] = []
    for event in events:
        copy = _new_object(NewEvent)
        _set_new_name(copy, event.name)
        _set_new_payload(copy, event.payload)
        _set_new_metadata(copy, {**event.metadata, **extra})
        _set_new_occurred_at(copy, event.occurred_at)
        copies.append(copy)
    return copies


_ID_CHUNK = 256
"""Ids ``new_event_id`` makes ahead per ``os.urandom`` call."""
_ID_VARIANT = bytes.maketrans(b"0123456789abcdef", b"89ab89ab89ab89ab")
"""Maps a random hex digit to the RFC 4122 variant's (binary 10xx), keeping 2 random bits."""


def new_event_ids(count: int) -> list[str]:
    """``count`` (at least 1) fresh event ids: random (version 4) UUIDs as text, 122
    random bits each.

    Made all at once as text, with no Python code run per id (a ``uuid.uuid4()`` object
    per id made ids a fifth of an in-memory publish's cost; cutting a hex string into
    groups per id, 0.4 us an id; this, 0.13): ``bytes.hex`` puts a "-" after every 4
    digits (2 bytes); three deletions with a step drop the "-"s that are not in the
    8-4-4-4-12 form, the "-" after each id becomes a ",", the version digit is set and
    the variant digit mapped, each for every id in one C call; then one split.
    """
    text = bytearray(os.urandom(16 * count).hex("-", 2), "ascii")
    # Per id: 8 groups of 4 digits, a "-" after each but the last id's last group.
    del text[4::40]  # xxxxxxxx-xxxx-xxxx-xxxx-xxxx-xxxx-xxxx- (39 per id)
    del text[28::39]  # xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxx-xxxx- (38)
    del text[32::38]  # xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx- (37)
    text[36::37] = b"," * (count - 1)
    text[14::37] = b"4" * count
    text[19::37] = text[19::37].translate(_ID_VARIANT)
    return text.decode("ascii").split(",")


_spare_ids: list[str] = []
"""Ids made ahead for ``new_event_id``; emptied in a forked child (its parent has them)."""
os.register_at_fork(after_in_child=_spare_ids.clear)


def new_event_id() -> str:
    """One fresh event id (as ``new_event_ids``), from ids made a chunk at a time: making
    one alone costs many times as much (the system call and formatting per call)."""
    try:
        return _spare_ids.pop()
    except IndexError:
        _spare_ids.extend(new_event_ids(_ID_CHUNK))
        return _spare_ids.pop()


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


def place_in(source: EventSourceIdentifier, event: StoredEvent) -> int:
    """Where ``event`` is in ``source``: its position in a stream, else its sequence number."""
    return event.position if isinstance(source, StreamIdentifier) else event.sequence_number


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


@lru_cache(maxsize=4096)
def source_key(identifier: EventSourceIdentifier) -> str:
    """The canonical text form of an identifier: its JSON with sorted keys, no spaces.

    Equal identifiers give equal keys; stores use it as the key of a source (every
    checkpoint save, parked-stream check and allocation round asks again, so the keys
    of the sources used lately are remembered).
    """
    return json.dumps(identifier.to_json(), sort_keys=True, separators=(",", ":"))

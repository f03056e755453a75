"""Write conditions: what a stream must look like for a publish to go ahead.

A condition is checked atomically with the write (optimistic concurrency); when it
does not hold, the publish raises ``UnmetWriteConditionError`` and writes nothing.

Every condition is a set of acceptable values for the stream's latest position
(``None`` standing for an empty stream), so ``&`` is intersection and ``|`` is union::

    stream_is_empty() | position_is(4)      # empty, or the latest event is at position 4
"""

from __future__ import annotations

from dataclasses import dataclass

from eventmill.errors import InvalidInputError, describe

MAX_POSITION = 2**63 - 1
"""The largest stream position a store can hold (PostgreSQL ``bigint``)."""


def _is_position(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_POSITION


@dataclass(frozen=True, slots=True)
class WriteCondition:
    """Holds when the stream's latest position (``None``: empty) is one of ``allowed``.

    Raises InvalidInputError unless ``allowed`` is a frozenset of ``None`` and ints from
    0 to ``MAX_POSITION`` and ``description`` is a str.
    """

    allowed: frozenset[int | None]
    description: str

    def __post_init__(self) -> None:
        if type(self.allowed) is not frozenset or not all(
            value is None or _is_position(value) for value in self.allowed
        ):
            raise InvalidInputError(
                f"allowed must be a frozenset of None and ints from 0 to {MAX_POSITION},"
                f" not {describe(self.allowed)}"
            )
        if not isinstance(self.description, str):
            raise InvalidInputError(f"description must be a str, not {describe(self.description)}")

    def is_met_by(self, latest_position: int | None) -> bool:
        return latest_position in self.allowed

    def __and__(self, other: WriteCondition) -> WriteCondition:
        if not isinstance(other, WriteCondition):
            return NotImplemented
        return WriteCondition(
            self.allowed & other.allowed, f"({self.description} & {other.description})"
        )

    def __or__(self, other: WriteCondition) -> WriteCondition:
        if not isinstance(other, WriteCondition):
            return NotImplemented
        return WriteCondition(
            self.allowed | other.allowed, f"({self.description} | {other.description})"
        )

    def __str__(self) -> str:
        return self.description


def stream_is_empty() -> WriteCondition:
    """The stream has no events yet."""
    return WriteCondition(frozenset([None]), "stream_is_empty()")


def position_is(position: int) -> WriteCondition:
    """The stream's latest event is at ``position`` (0 for a stream of one event)."""
    if not _is_position(position):
        raise InvalidInputError(
            f"position_is() takes an int from 0 to {MAX_POSITION}, not {describe(position)}"
        )
    return WriteCondition(frozenset([position]), f"position_is({position})")


def check_condition(value: object) -> WriteCondition | None:
    """Return ``value`` if it is a condition or None; raise InvalidInputError if not."""
    if value is None or isinstance(value, WriteCondition):
        return value
    raise InvalidInputError(f"condition must be a WriteCondition or None, not {describe(value)}")

"""Every exception eventmill raises.

Public methods raise only these (driver errors are wrapped, with the original as
``__cause__``); ``asyncio.CancelledError`` and ``KeyboardInterrupt`` always pass
through untouched.

::

    EventmillError
    ├── InvalidInputError            bad input, refused before anything is written
    │   ├── InvalidEventError        event name, payload, metadata or time
    │   ├── InvalidIdentifierError   category, stream, identifier or its JSON form
    │   └── InvalidSettingsError     a setting out of range or of the wrong type
    │       └── PartitioningChangedError  partitions unlike the group's checkpoints
    ├── UnmetWriteConditionError     a write condition did not hold; nothing written
    ├── ConflictError                optimistic concurrency lost (checkpoints, state)
    │   ├── StaleEpochError          a save from a holder whose source moved away
    │   └── GroupInUseError          retiring a group that a live node registers
    ├── LifecycleError               used in the wrong state: started twice, closed...
    ├── LockLostError                a held lock is gone (its connection died)
    ├── ExitRequestedError           a service asked for an orderly exit (ExitDecision)
    ├── StopTimeoutError             services still running when a stop timed out
    ├── CatchUpTimeoutError          a node did not catch up within the time given
    ├── MissingDependencyError       an optional extra is not installed (an ImportError)
    ├── EventDecodingError           a stored event does not fit its typed class
    ├── ProcessorFailedError         a processor's failure stops its group or node
    └── StorageError                 the backend failed (database down, timeout...)
        └── SchemaError              schema missing or of another version
"""

from __future__ import annotations

from typing import Any


class EventmillError(Exception):
    """Base of every eventmill error."""


class InvalidInputError(EventmillError, ValueError):
    """Input refused before anything was written."""


class InvalidEventError(InvalidInputError):
    """An event's name, payload, metadata or time is not acceptable."""


class InvalidIdentifierError(InvalidInputError):
    """A category, stream, group, identifier or serialised identifier is not acceptable."""


class InvalidSettingsError(InvalidInputError):
    """A setting is out of range or of the wrong type."""


class PartitioningChangedError(InvalidSettingsError):
    """A group asks for a category in another number of partitions than its stored
    checkpoints; see ``eventmill.partitions`` for why and how to reset."""


class UnmetWriteConditionError(EventmillError):
    """A write condition did not hold when checked, atomically with the write.

    ``expected`` describes the condition; ``found`` is the stream's latest position
    when it was checked (``None`` for an empty stream). Nothing was written.
    """

    def __init__(self, expected: Any, found: int | None) -> None:
        self.expected = expected
        self.found = found
        found_text = "an empty stream" if found is None else f"latest position {found}"
        super().__init__(f"write condition {expected} not met: found {found_text}")


class ConflictError(EventmillError):
    """Someone else changed the record since it was read (optimistic concurrency)."""


class StaleEpochError(ConflictError):
    """A save carried an epoch older than the source's current one: the source moved."""


class GroupInUseError(ConflictError):
    """A group cannot be retired: a live node still registers a subscriber of it."""


class LifecycleError(EventmillError, RuntimeError):
    """An object was used in a state that does not allow it (started twice, closed...)."""


class LockLostError(EventmillError):
    """A lock this process held is gone, for example because its connection died."""


class ExitRequestedError(EventmillError):
    """A service's error handler decided the process should exit with ``code``.

    ``ErrorHandlingService`` raises it (the original exception is the ``__cause__``);
    ``ServiceManager`` turns it into an orderly stop of every service followed by
    ``SystemExit(code)``.
    """

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"exit requested with code {code}")


class StopTimeoutError(EventmillError, TimeoutError):
    """Services were still running when the stop timeout expired; ``names`` lists them."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        super().__init__(f"services still running after the stop timeout: {', '.join(names)}")


class CatchUpTimeoutError(EventmillError, TimeoutError):
    """``EventProcessingNode.wait_caught_up`` ran out of time."""


class MissingDependencyError(EventmillError, ImportError):
    """A feature needs an optional extra that is not installed; the message says what
    to install."""


class EventDecodingError(EventmillError):
    """A stored event cannot become its typed class: its name or version is not
    registered, an upcaster is missing, or its payload does not fit the class."""


class ProcessorFailedError(EventmillError):
    """A processor raised on an event and the group's failure policy stops the group
    (``stops_node`` False) or the node (True). The message names the group, source,
    stream, position, sequence number and event name in one line; the processor's
    exception is the ``__cause__``."""

    def __init__(self, message: str, *, stops_node: bool) -> None:
        super().__init__(message)
        self.stops_node = stops_node


class StorageError(EventmillError):
    """The storage backend failed; the original driver error is the ``__cause__``."""


class SchemaError(StorageError):
    """The database schema is missing or of a version this code does not know."""


def describe(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages; never raises
    (an int too long to print, or an object whose ``__repr__`` fails, is named by type)."""
    try:
        text = repr(value)
    except Exception:
        return f"<{type(value).__name__} that cannot be shown>"
    return text if len(text) <= limit else text[: limit - 3] + "..."

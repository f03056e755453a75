"""eventmill: an asyncio event store with subscribers, projections and a distributed broker.

The names here are the public API; everything else is internal unless documented.
"""

from eventmill.conditions import WriteCondition, position_is, stream_is_empty
from eventmill.errors import (
    ConflictError,
    EventmillError,
    InvalidEventError,
    InvalidIdentifierError,
    InvalidInputError,
    InvalidSettingsError,
    LifecycleError,
    LockLostError,
    SchemaError,
    StaleEpochError,
    StorageError,
    UnmetWriteConditionError,
)
from eventmill.events import (
    CategoryIdentifier,
    CategoryPartitionIdentifier,
    EventSourceIdentifier,
    LogIdentifier,
    NewEvent,
    StoredEvent,
    StreamIdentifier,
    identifier_from_json,
)
from eventmill.store import EventCategory, EventLog, EventStore, EventStream

__all__ = [
    "CategoryIdentifier",
    "CategoryPartitionIdentifier",
    "ConflictError",
    "EventCategory",
    "EventLog",
    "EventSourceIdentifier",
    "EventStore",
    "EventStream",
    "EventmillError",
    "InvalidEventError",
    "InvalidIdentifierError",
    "InvalidInputError",
    "InvalidSettingsError",
    "LifecycleError",
    "LockLostError",
    "LogIdentifier",
    "NewEvent",
    "SchemaError",
    "StaleEpochError",
    "StorageError",
    "StoredEvent",
    "StreamIdentifier",
    "UnmetWriteConditionError",
    "WriteCondition",
    "identifier_from_json",
    "position_is",
    "stream_is_empty",
]

"""eventmill: an asyncio event store with subscribers, projections and a distributed broker.

The names here are the public API; everything else is internal unless documented.
``__version__`` is the installed distribution's version.
"""

from importlib.metadata import version as _distribution_version

from eventmill.backends.base import Backend, ConsumerTransaction, LockManager
from eventmill.blocking import BlockingEventStore
from eventmill.broker.base import EventBroker
from eventmill.broker.coordinator import EventSubscriptionCoordinator
from eventmill.broker.distributed import (
    DistributedEventBroker,
    DistributedEventBrokerSettings,
    make_event_broker,
)
from eventmill.broker.observer import EventSubscriptionObserver
from eventmill.broker.singleton import SingletonEventBroker
from eventmill.broker.subscriber_manager import EventSubscriberManager
from eventmill.conditions import WriteCondition, position_is, stream_is_empty
from eventmill.consumers import (
    AutoCommitEventIteratorProcessor,
    EventConsumerStateStore,
    EventProcessor,
    EventSourceConsumer,
    EventSubscriptionConsumer,
    FailureAction,
    FailurePolicy,
    ManagedEventIteratorProcessor,
    TransactionalEventProcessor,
    make_subscriber,
    parked_streams,
    retry_parked,
    skip_parked,
)
from eventmill.encoding import Codec
from eventmill.errors import (
    CatchUpTimeoutError,
    ConflictError,
    EventDecodingError,
    EventmillError,
    ExitRequestedError,
    InvalidEventError,
    InvalidIdentifierError,
    InvalidInputError,
    InvalidSettingsError,
    LifecycleError,
    LockLostError,
    MissingDependencyError,
    PartitioningChangedError,
    ProcessorFailedError,
    SchemaError,
    StaleEpochError,
    StopTimeoutError,
    StorageError,
    UnmetWriteConditionError,
)
from eventmill.event_types import EventTypes, encode_event
from eventmill.events import (
    CategoryIdentifier,
    CategoryPartitionIdentifier,
    EventSourceIdentifier,
    JsonObject,
    JsonValue,
    LogIdentifier,
    NewEvent,
    StoredEvent,
    StreamIdentifier,
    identifier_from_json,
)
from eventmill.handlers import HandlerProcessor, handles
from eventmill.node import EventProcessingNode, NodeMode, NodeSettings
from eventmill.projections import ProjectionProcessor, ProjectionStore, Projector
from eventmill.services import (
    ContinueErrorHandler,
    ErrorHandlingService,
    ExecutionMode,
    ExitErrorHandler,
    IsolationMode,
    PollingService,
    Process,
    ProcessStatus,
    RaiseErrorHandler,
    RetryErrorHandler,
    Service,
    ServiceManager,
    TypeMappingErrorHandler,
)
from eventmill.store import EventCategory, EventLog, EventStore, EventStream

__version__ = _distribution_version("eventmill")

__all__ = [
    "AutoCommitEventIteratorProcessor",
    "Backend",
    "BlockingEventStore",
    "CatchUpTimeoutError",
    "CategoryIdentifier",
    "CategoryPartitionIdentifier",
    "Codec",
    "ConflictError",
    "ConsumerTransaction",
    "ContinueErrorHandler",
    "DistributedEventBroker",
    "DistributedEventBrokerSettings",
    "ErrorHandlingService",
    "EventBroker",
    "EventCategory",
    "EventConsumerStateStore",
    "EventDecodingError",
    "EventLog",
    "EventProcessingNode",
    "EventProcessor",
    "EventSourceConsumer",
    "EventSourceIdentifier",
    "EventStore",
    "EventStream",
    "EventSubscriberManager",
    "EventSubscriptionConsumer",
    "EventSubscriptionCoordinator",
    "EventSubscriptionObserver",
    "EventTypes",
    "EventmillError",
    "ExecutionMode",
    "ExitErrorHandler",
    "ExitRequestedError",
    "FailureAction",
    "FailurePolicy",
    "HandlerProcessor",
    "InvalidEventError",
    "InvalidIdentifierError",
    "InvalidInputError",
    "InvalidSettingsError",
    "IsolationMode",
    "JsonObject",
    "JsonValue",
    "LifecycleError",
    "LockLostError",
    "LockManager",
    "LogIdentifier",
    "ManagedEventIteratorProcessor",
    "MissingDependencyError",
    "NewEvent",
    "NodeMode",
    "NodeSettings",
    "PartitioningChangedError",
    "PollingService",
    "Process",
    "ProcessStatus",
    "ProcessorFailedError",
    "ProjectionProcessor",
    "ProjectionStore",
    "Projector",
    "RaiseErrorHandler",
    "RetryErrorHandler",
    "SchemaError",
    "Service",
    "ServiceManager",
    "SingletonEventBroker",
    "StaleEpochError",
    "StopTimeoutError",
    "StorageError",
    "StoredEvent",
    "StreamIdentifier",
    "TransactionalEventProcessor",
    "TypeMappingErrorHandler",
    "UnmetWriteConditionError",
    "WriteCondition",
    "encode_event",
    "handles",
    "identifier_from_json",
    "make_event_broker",
    "make_subscriber",
    "parked_streams",
    "position_is",
    "retry_parked",
    "skip_parked",
    "stream_is_empty",
]

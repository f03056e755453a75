"""Consumers: processors, the single-source consumer, checkpoints per group and
source, and the subscriber a broker drives."""

from eventmill.consumers.failures import (
    FailureAction,
    FailurePolicy,
    parked_streams,
    retry_parked,
    skip_parked,
)
from eventmill.consumers.processors import (
    AutoCommitEventIteratorProcessor,
    ConsumerProgress,
    EventProcessor,
    ManagedEventIteratorProcessor,
    Processor,
    TransactionalEventProcessor,
)
from eventmill.consumers.source_consumer import ConsumerSettings, EventSourceConsumer
from eventmill.consumers.state import EventConsumerStateStore
from eventmill.consumers.subscription_consumer import (
    EventSubscriber,
    EventSubscriptionConsumer,
    make_subscriber,
)

__all__ = [
    "AutoCommitEventIteratorProcessor",
    "ConsumerProgress",
    "ConsumerSettings",
    "EventConsumerStateStore",
    "EventProcessor",
    "EventSourceConsumer",
    "EventSubscriber",
    "EventSubscriptionConsumer",
    "FailureAction",
    "FailurePolicy",
    "ManagedEventIteratorProcessor",
    "Processor",
    "TransactionalEventProcessor",
    "make_subscriber",
    "parked_streams",
    "retry_parked",
    "skip_parked",
]

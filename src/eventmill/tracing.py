"""OpenTelemetry traces (optional extra ``eventmill[otel]``: ``opentelemetry-api``,
imported only here; spans are recorded once the application installs an SDK).

::

    await tracing.publish(store.stream(category="orders", stream="order-1"), events)
    node.register_subscriber(group="totals", source=orders,
                             processor=tracing.traced(totals, group="totals"))

- ``publish``: a PRODUCER span ``eventmill publish`` around the write; each event's
  metadata carries the trace context (W3C ``traceparent``, ``tracestate``), so it is
  stored with the event;
- ``traced``: wraps an async function or ``EventProcessor`` (a CONSUMER span
  ``eventmill process`` per event, linked to the publisher's span and its child when
  it is the current trace) or a ``TransactionalEventProcessor`` (one span per batch,
  linked to the publishers of up to 32 of its events).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from eventmill.backends.base import ConsumerTransaction
from eventmill.conditions import WriteCondition
from eventmill.consumers.processors import EventProcessor, TransactionalEventProcessor
from eventmill.errors import InvalidInputError, MissingDependencyError
from eventmill.events import EventSourceIdentifier, NewEvent, StoredEvent
from eventmill.store import EventStream

try:
    from opentelemetry import propagate, trace
except ImportError as missing:  # pragma: no cover - depends on the installation
    raise MissingDependencyError(
        "eventmill tracing needs opentelemetry-api: pip install 'eventmill[otel]'"
    ) from missing

MAX_LINKS = 32
"""Links per batch span."""

_tracer = trace.get_tracer("eventmill")


def with_trace_context(events: Sequence[NewEvent]) -> list[NewEvent]:
    """``events`` with the current trace context added to their metadata (unchanged
    when there is no current span)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return list(events)
    return [
        NewEvent(
            name=event.name,
            payload=event.payload,
            metadata={**event.metadata, **carrier},
            occurred_at=event.occurred_at,
        )
        for event in events
    ]


async def publish(
    stream: EventStream,
    events: Sequence[NewEvent],
    *,
    condition: WriteCondition | None = None,
) -> list[StoredEvent]:
    """``stream.publish`` in a PRODUCER span, the trace context in each event's
    metadata. Raises what ``publish`` raises (recorded on the span)."""
    with _tracer.start_as_current_span(
        "eventmill publish",
        kind=trace.SpanKind.PRODUCER,
        attributes={
            "messaging.system": "eventmill",
            "messaging.destination.name": str(stream.identifier),
            "messaging.batch.message_count": len(events),
        },
    ):
        return await stream.publish(with_trace_context(events), condition=condition)


def _link(event: StoredEvent) -> trace.Link | None:
    metadata: dict[str, Any] = dict(event.metadata)
    context = trace.get_current_span(propagate.extract(metadata)).get_span_context()
    return trace.Link(context) if context.is_valid else None


@contextmanager
def _span(group: str, events: Sequence[StoredEvent]) -> Iterator[None]:
    links = [link for event in events[:MAX_LINKS] if (link := _link(event)) is not None]
    attributes: dict[str, Any] = {
        "messaging.system": "eventmill",
        "messaging.consumer.group.name": group,
        "messaging.batch.message_count": len(events),
    }
    if len(events) == 1:
        attributes["messaging.message.id"] = str(events[0].id)
        attributes["messaging.destination.name"] = f"{events[0].category}/{events[0].stream}"
    with _tracer.start_as_current_span(
        "eventmill process", kind=trace.SpanKind.CONSUMER, links=links, attributes=attributes
    ):
        yield


class _TracedFunction(EventProcessor):
    def __init__(self, function: Callable[[StoredEvent], Awaitable[None]], group: str) -> None:
        self._function = function
        self._group = group

    async def process_event(self, event: StoredEvent) -> None:
        with _span(self._group, [event]):
            await self._function(event)


class _TracedTransactional(TransactionalEventProcessor):
    def __init__(self, processor: TransactionalEventProcessor, group: str) -> None:
        self._processor = processor
        self._group = group

    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        with _span(self._group, events):
            await self._processor.process_events(events, transaction)

    async def on_reset(
        self, source: EventSourceIdentifier, after: int | None, transaction: ConsumerTransaction
    ) -> None:
        await self._processor.on_reset(source, after, transaction)


def traced(
    processor: EventProcessor
    | TransactionalEventProcessor
    | Callable[[StoredEvent], Awaitable[None]],
    *,
    group: str,
) -> EventProcessor | TransactionalEventProcessor:
    """``processor`` with a span per event (per batch for a transactional one); see the
    module docstring. Raises InvalidInputError for iterator processors."""
    if isinstance(processor, TransactionalEventProcessor):
        return _TracedTransactional(processor, group)
    if isinstance(processor, EventProcessor):
        return _TracedFunction(processor.process_event, group)
    if callable(processor):
        return _TracedFunction(processor, group)
    raise InvalidInputError(f"cannot trace {processor!r:.80}: not a function or EventProcessor")

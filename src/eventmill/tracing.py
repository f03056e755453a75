"""OpenTelemetry traces (optional extra ``eventmill[otel]``: ``opentelemetry-api``,
imported only here; spans are recorded once the application installs an SDK).

::

    await tracing.publish(store.stream(category="orders", stream="order-1"), events)
    node.register_subscriber(group="totals", source=orders,
                             processor=tracing.traced(totals, group="totals"))

- ``publish``: a PRODUCER span ``eventmill publish`` around the write; while that span
  is recorded (sampled), each event's metadata carries the trace context (by the
  configured propagator: W3C ``traceparent``, ``tracestate`` by default), so it is
  stored with the event; an unsampled publish stores nothing of it. With no tracer
  provider installed it is ``stream.publish``, nothing added;
- ``traced``: wraps an async function or ``EventProcessor`` (a CONSUMER span
  ``eventmill process`` per page of events read from the source, and per held event
  replayed) or a ``TransactionalEventProcessor`` (one per batch). The span links to
  the distinct publish spans of the first ``MAX_LINKS`` of its events and is the
  current span while they are processed (so the processor's own spans are its
  children); its attributes give the group, the event count and the first and last
  sequence numbers.

A span per page rather than per event keeps tracing within a few percent of the
throughput of a processor that does little (a recorded span costs tens of
microseconds, as much as processing an event).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from eventmill.backends.base import ConsumerTransaction
from eventmill.conditions import WriteCondition
from eventmill.consumers.processors import EventProcessor, TransactionalEventProcessor
from eventmill.errors import InvalidInputError, MissingDependencyError
from eventmill.events import EventSourceIdentifier, NewEvent, StoredEvent
from eventmill.store import EventStream

try:
    from opentelemetry import context, propagate, trace
except ImportError as missing:  # pragma: no cover - depends on the installation
    raise MissingDependencyError(
        "eventmill tracing needs opentelemetry-api: pip install 'eventmill[otel]'"
    ) from missing

MAX_LINKS = 32
"""The most events of a page or batch whose publish spans its span links to."""

_tracer = trace.get_tracer("eventmill")


def _nothing_around(events: Sequence[StoredEvent]) -> AbstractContextManager[None]:
    return nullcontext()


def _installed() -> bool:
    """Whether the application installed a tracer provider (an SDK)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def with_trace_context(events: Sequence[NewEvent]) -> list[NewEvent]:
    """``events`` with the current span's trace context added to their metadata
    (unchanged when no current span is recording: a context no span was recorded for
    would link processing spans to nothing)."""
    if not trace.get_current_span().is_recording():
        return list(events)
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
    if not _installed():
        return await stream.publish(events, condition=condition)
    span = _tracer.start_span(
        "eventmill publish",
        kind=trace.SpanKind.PRODUCER,
        attributes={
            "messaging.system": "eventmill",
            "messaging.destination.name": str(stream.identifier),
            "messaging.batch.message_count": len(events),
        },
    )
    with _current(span):
        return await stream.publish(with_trace_context(events), condition=condition)


@contextmanager
def _current(span: trace.Span) -> Iterator[None]:
    """``span`` as the current span until the block ends, then ended; an exception
    leaving the block is recorded on it as start_as_current_span would. Attached by
    hand: start_as_current_span's two nested context managers cost a third as much
    as the span itself."""
    token = context.attach(trace.set_span_in_context(span))
    try:
        yield
    except Exception as error:
        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        raise
    finally:
        context.detach(token)
        span.end()


def _links(events: Sequence[StoredEvent]) -> list[trace.Link]:
    links: list[trace.Link] = []
    fields = list(propagate.get_global_textmap().fields)
    seen: set[tuple[object, ...]] = set()
    for event in events[:MAX_LINKS]:
        metadata = event.metadata
        key = tuple([metadata.get(field) for field in fields])
        if key in seen:  # the events of one publish share their context
            continue
        seen.add(key)
        carrier: dict[str, Any] = dict(metadata)
        context = trace.get_current_span(propagate.extract(carrier)).get_span_context()
        if context.is_valid:
            links.append(trace.Link(context))
    return links


@contextmanager
def _span(group: str, events: Sequence[StoredEvent]) -> Iterator[None]:
    """The CONSUMER span of ``events`` (see the module docstring); nothing when no
    tracer provider is installed."""
    if not events or not _installed():
        yield
        return
    attributes: dict[str, Any] = {
        "messaging.system": "eventmill",
        "messaging.operation.type": "process",
        "messaging.consumer.group.name": group,
        "messaging.batch.message_count": len(events),
        "eventmill.first_sequence_number": events[0].sequence_number,
        "eventmill.last_sequence_number": events[-1].sequence_number,
    }
    if len(events) == 1:
        attributes["messaging.message.id"] = str(events[0].id)
        attributes["messaging.destination.name"] = f"{events[0].category}/{events[0].stream}"
    span = _tracer.start_span(
        "eventmill process",
        kind=trace.SpanKind.CONSUMER,
        links=_links(events),
        attributes=attributes,
    )
    with _current(span):
        yield


class _TracedEach(EventProcessor):
    def __init__(
        self,
        process: Callable[[StoredEvent], Awaitable[None]],
        around: Callable[[Sequence[StoredEvent]], AbstractContextManager[None]],
        group: str,
    ) -> None:
        # The processor's own function, not a delegating method: no cost per event.
        self.process_event = process  # type: ignore[method-assign,assignment]
        self._around = around
        self._group = group

    async def process_event(self, event: StoredEvent) -> None:  # replaced in __init__
        raise AssertionError("unreachable")  # pragma: no cover

    @contextmanager
    def around_page(self, events: Sequence[StoredEvent]) -> Iterator[None]:
        with _span(self._group, events), self._around(events):
            yield


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
    """``processor`` with a span per page of events (per batch for a transactional
    one); see the module docstring. Raises InvalidInputError for iterator processors."""
    if isinstance(processor, TransactionalEventProcessor):
        return _TracedTransactional(processor, group)
    if isinstance(processor, EventProcessor):
        return _TracedEach(processor.process_event, processor.around_page, group)
    if callable(processor):
        return _TracedEach(processor, _nothing_around, group)
    raise InvalidInputError(f"cannot trace {processor!r:.80}: not a function or EventProcessor")

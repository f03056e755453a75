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
  the distinct publish spans of the first ``MAX_LINKS`` of its events (a trace
  context that is not text, or not valid, links nothing) and is the current span
  while they are processed (so the processor's own spans are its children); its
  attributes give the group, the event count and the first and last sequence numbers.

A span per page rather than per event: a recorded span costs tens of microseconds, as
much as processing an event that does little. What eventmill adds around the SDK's
spans is kept small (the context written once per publish and shared by its events,
each distinct context parsed once); the SDK's span itself is the larger part (see
docs/operations.md, Cost).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from eventmill.backends.base import ConsumerTransaction
from eventmill.conditions import WriteCondition
from eventmill.consumers.processors import EventProcessor, TransactionalEventProcessor
from eventmill.errors import InvalidInputError, MissingDependencyError
from eventmill.events import (
    EventSourceIdentifier,
    JsonObject,
    JsonValue,
    NewEvent,
    StoredEvent,
    with_added_metadata,
)
from eventmill.store import EventStream

try:
    from opentelemetry import context, propagate, trace
    from opentelemetry.propagators.textmap import TextMapPropagator
except ImportError as missing:  # pragma: no cover - depends on the installation
    raise MissingDependencyError(
        "eventmill tracing needs opentelemetry-api: pip install 'eventmill[otel]'"
    ) from missing

MAX_LINKS = 32
"""How many events at the start of a page or batch its span looks at for the publish
spans to link to (each distinct one once)."""

_CACHED_CONTEXTS = 1024
"""How many parsed trace contexts ``_Links`` keeps (all are dropped when it is full)."""

_NOTHING = nullcontext()

_tracer: trace.Tracer | None = None


def _sdk_tracer() -> trace.Tracer | None:
    """The tracer of the tracer provider the application installed (an SDK), or None
    while none is. Kept once found: OpenTelemetry refuses to replace a provider."""
    global _tracer
    if _tracer is None and not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        _tracer = trace.get_tracer("eventmill")
    return _tracer


def with_trace_context(events: Sequence[NewEvent]) -> list[NewEvent]:
    """``events`` with the current span's trace context added to their metadata
    (unchanged when no current span is recording: a context no span was recorded for
    would link processing spans to nothing). The context is written once and shared:
    the events are not validated again."""
    if not trace.get_current_span().is_recording():
        return list(events)
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return list(events)
    return with_added_metadata(events, carrier)


async def publish(
    stream: EventStream,
    events: Sequence[NewEvent],
    *,
    condition: WriteCondition | None = None,
) -> list[StoredEvent]:
    """``stream.publish`` in a PRODUCER span, the trace context in each event's
    metadata. Raises what ``publish`` raises (recorded on the span)."""
    tracer = _sdk_tracer()
    if tracer is None:
        return await stream.publish(events, condition=condition)
    span = tracer.start_span(
        "eventmill publish",
        kind=trace.SpanKind.PRODUCER,
        attributes={
            "messaging.system": "eventmill",
            "messaging.destination.name": str(stream.identifier),
            "messaging.batch.message_count": len(events),
        },
    )
    with _Current(span):
        return await stream.publish(with_trace_context(events), condition=condition)


class _Current:
    """``span`` as the current span until the block ends, then ended; an exception
    leaving the block is recorded on it as start_as_current_span would. Attached by
    hand, in a class rather than a generator: start_as_current_span's two nested
    context managers cost a third as much as the span itself."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: trace.Span) -> None:
        self._span = span

    def __enter__(self) -> None:
        self._token = context.attach(trace.set_span_in_context(self._span))

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: object
    ) -> None:
        span = self._span
        if isinstance(error, Exception):
            span.record_exception(error)
            span.set_status(
                trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}")
            )
        context.detach(self._token)
        span.end()


class _Links:
    """The links of a processing span: the distinct valid publish span contexts in the
    metadata of the first ``MAX_LINKS`` events, in order.

    Parsing a context (the propagator's extract) costs as much as a tenth of a span, and
    the events of one publish carry the same one, often across consecutive pages: so an
    event whose metadata equals the one before it is skipped, and each distinct carrier
    (the values of the propagator's fields) is parsed once and kept, up to
    ``_CACHED_CONTEXTS``. Only text values are handed to the propagator: metadata written
    by hand may hold anything JSON under its keys.
    """

    def __init__(self) -> None:
        # One tuple, replaced whole when the global propagator changes: threads that
        # read it see a propagator with its own fields and parsed contexts.
        self._state: tuple[
            object, tuple[str, ...], dict[tuple[JsonValue, ...], trace.SpanContext | None]
        ] = (None, (), {})

    def __call__(self, events: Sequence[StoredEvent]) -> list[trace.Link]:
        propagator = propagate.get_global_textmap()
        known, fields, parsed = self._state
        if propagator is not known:
            fields = tuple(sorted(propagator.fields))
            parsed = {}
            self._state = (propagator, fields, parsed)
        links: list[trace.Link] = []
        linked: set[tuple[int, int]] = set()  # trace and span ids
        previous: JsonObject | None = None
        for event in events[:MAX_LINKS]:
            metadata = event.metadata
            if metadata == previous:
                continue
            previous = metadata
            key = tuple([metadata.get(field) for field in fields])
            try:
                found = parsed[key]
            except (KeyError, TypeError):  # TypeError: a list or object under a field
                found = _parse(propagator, fields, key, parsed)
            if found is not None and (found.trace_id, found.span_id) not in linked:
                linked.add((found.trace_id, found.span_id))
                links.append(trace.Link(found))
        return links


def _parse(
    propagator: TextMapPropagator,
    fields: tuple[str, ...],
    values: tuple[JsonValue, ...],
    parsed: dict[tuple[JsonValue, ...], trace.SpanContext | None],
) -> trace.SpanContext | None:
    """The valid span context ``propagator`` reads from ``fields`` holding ``values``
    (their text ones: other JSON is no trace context), kept in ``parsed``."""
    texts = tuple([value if type(value) is str else None for value in values])
    if texts in parsed:
        return parsed[texts]
    carrier = {field: text for field, text in zip(fields, texts, strict=True) if text is not None}
    found = trace.get_current_span(propagator.extract(carrier)).get_span_context()
    if len(parsed) >= _CACHED_CONTEXTS:
        parsed.clear()
    parsed[texts] = context_or_none = found if carrier and found.is_valid else None
    return context_or_none


_links = _Links()


def _processing(group: str, events: Sequence[StoredEvent]) -> AbstractContextManager[None]:
    """The CONSUMER span of ``events`` (see the module docstring) as the current span
    while the block runs; nothing when no tracer provider is installed. The links are
    given at the start, where a sampler can see them."""
    tracer = _sdk_tracer()
    if tracer is None or not events:
        return _NOTHING
    first, last = events[0], events[-1]
    attributes: dict[str, Any] = {
        "messaging.system": "eventmill",
        "messaging.operation.type": "process",
        "messaging.consumer.group.name": group,
        "messaging.batch.message_count": len(events),
        "eventmill.first_sequence_number": first.sequence_number,
        "eventmill.last_sequence_number": last.sequence_number,
    }
    if len(events) == 1:
        attributes["messaging.message.id"] = str(first.id)
        attributes["messaging.destination.name"] = f"{first.category}/{first.stream}"
    span = tracer.start_span(
        "eventmill process",
        kind=trace.SpanKind.CONSUMER,
        links=_links(events),
        attributes=attributes,
    )
    return _Current(span)


class _TracedEach(EventProcessor):
    def __init__(
        self,
        process: Callable[[StoredEvent], Awaitable[None]],
        around: Callable[[Sequence[StoredEvent]], AbstractContextManager[None]] | None,
        group: str,
    ) -> None:
        # The processor's own function, not a delegating method: no cost per event.
        self.process_event = process  # type: ignore[method-assign,assignment]
        self._around = around
        self._group = group

    async def process_event(self, event: StoredEvent) -> None:  # replaced in __init__
        raise AssertionError("unreachable")  # pragma: no cover

    def around_page(self, events: Sequence[StoredEvent]) -> AbstractContextManager[None]:
        if self._around is None:  # a function: the span alone, no generator around it
            return _processing(self._group, events)
        return self._both(self._around, events)

    @contextmanager
    def _both(
        self,
        around: Callable[[Sequence[StoredEvent]], AbstractContextManager[None]],
        events: Sequence[StoredEvent],
    ) -> Iterator[None]:
        with _processing(self._group, events), around(events):
            yield


class _TracedTransactional(TransactionalEventProcessor):
    def __init__(self, processor: TransactionalEventProcessor, group: str) -> None:
        self._processor = processor
        self._group = group

    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        with _processing(self._group, events):
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
        return _TracedEach(processor, None, group)
    raise InvalidInputError(f"cannot trace {processor!r:.80}: not a function or EventProcessor")

"""Traces: a publish span whose context travels in the events' metadata, and
processing spans (per event, per transactional batch) linked to it; recorded with the
OpenTelemetry SDK's in-memory exporter."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import default_getter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from eventmill import tracing
from eventmill.backends.base import ConsumerTransaction
from eventmill.backends.memory import InMemoryBackend
from eventmill.conditions import stream_is_empty
from eventmill.consumers.processors import EventProcessor, TransactionalEventProcessor
from eventmill.errors import InvalidEventError, UnmetWriteConditionError
from eventmill.events import (
    CategoryIdentifier,
    JsonObject,
    NewEvent,
    StoredEvent,
    with_added_metadata,
)
from eventmill.node import EventProcessingNode
from eventmill.store import EventStore


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """The process's tracer provider (set once: OpenTelemetry allows no second)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


class Batches(TransactionalEventProcessor):
    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        pass


async def traced_work(event: StoredEvent) -> None:
    with trace.get_tracer("app").start_as_current_span("app work"):
        pass


async def test_processing_spans_link_to_the_publish_span(spans: InMemorySpanExporter) -> None:
    spans.clear()
    backend = InMemoryBackend()
    store = EventStore(backend)
    stored = await tracing.publish(
        store.stream(category="orders", stream="o-1"),
        [NewEvent(name="placed", metadata={"by": "test"}), NewEvent(name="paid")],
    )
    assert stored[0].metadata["by"] == "test" and "traceparent" in stored[0].metadata
    (published,) = spans.get_finished_spans()
    assert published.name == "eventmill publish"
    assert published.attributes is not None
    assert published.attributes["messaging.batch.message_count"] == 2
    node = EventProcessingNode(backend, node_id="n")
    orders = CategoryIdentifier("orders")
    node.register_subscriber(
        group="each", source=orders, processor=tracing.traced(traced_work, group="each")
    )
    node.register_subscriber(
        group="batch", source=orders, processor=tracing.traced(Batches(), group="batch")
    )
    async with node:
        await node.wait_caught_up(timeout=timedelta(seconds=10))
    finished = spans.get_finished_spans()
    processed = [s for s in finished if s.name == "eventmill process"]
    groups = sorted(str((s.attributes or {})["messaging.consumer.group.name"]) for s in processed)
    assert groups == ["batch", "each"]  # one span per page, one per batch
    assert published.context is not None
    for span in processed:
        assert [link.context.span_id for link in span.links] == [published.context.span_id]
        assert span.attributes is not None
        assert span.attributes["messaging.batch.message_count"] == 2
        assert span.attributes["eventmill.first_sequence_number"] == stored[0].sequence_number
        assert span.attributes["eventmill.last_sequence_number"] == stored[1].sequence_number
    page = next(
        s for s in processed if (s.attributes or {})["messaging.consumer.group.name"] == "each"
    )
    work = [s for s in finished if s.name == "app work"]
    assert page.context is not None and len(work) == 2
    assert all(s.parent is not None and s.parent.span_id == page.context.span_id for s in work)


def test_without_a_current_span_metadata_is_unchanged() -> None:
    event = NewEvent(name="placed", metadata={"a": 1})
    assert tracing.with_trace_context([event]) == [event]


async def test_a_publish_not_recorded_writes_no_trace_context(
    spans: InMemorySpanExporter,
) -> None:
    spans.clear()
    unsampled = trace.SpanContext(
        trace_id=1, span_id=2, is_remote=True, trace_flags=trace.TraceFlags(0)
    )
    stream = EventStore(InMemoryBackend()).stream(category="orders", stream="o-1")
    with trace.use_span(trace.NonRecordingSpan(unsampled)):
        (stored,) = await tracing.publish(stream, [NewEvent(name="placed", metadata={"a": 1})])
    assert stored.metadata == {"a": 1}
    assert spans.get_finished_spans() == ()


async def test_a_failed_publish_is_recorded_on_its_span(spans: InMemorySpanExporter) -> None:
    spans.clear()
    stream = EventStore(InMemoryBackend()).stream(category="orders", stream="o-1")
    await stream.publish([NewEvent(name="placed")])
    with pytest.raises(UnmetWriteConditionError):
        await tracing.publish(stream, [NewEvent(name="placed")], condition=stream_is_empty())
    (published,) = spans.get_finished_spans()
    assert published.status.status_code is trace.StatusCode.ERROR
    assert [event.name for event in published.events] == ["exception"]
    assert trace.get_current_span() is trace.INVALID_SPAN  # the publish span detached


async def test_a_page_span_links_each_distinct_publish_of_its_first_events_once(
    spans: InMemorySpanExporter,
) -> None:
    spans.clear()
    store = EventStore(InMemoryBackend())
    for n in range(tracing.MAX_LINKS + 8):  # one publish span per event, some of 2 events
        await tracing.publish(
            store.stream(category="orders", stream=f"o-{n}"),
            [NewEvent(name="placed", metadata={"n": n})] * (1 + n % 2),
        )
    publishes = [s.context.span_id for s in spans.get_finished_spans() if s.context is not None]
    events = await store.category("orders").read()
    first = events[: tracing.MAX_LINKS]  # the span looks at these only
    numbers = [e.metadata["n"] for e in first]
    distinct = list(dict.fromkeys(n for n in numbers if isinstance(n, int)))
    assert len(distinct) == 22 and len(events) > len(first)  # events of 22 publishes
    links = tracing._links(events)
    assert [link.context.span_id for link in links] == [publishes[n] for n in distinct]


async def test_a_trace_context_not_made_of_text_links_nothing_and_fails_nothing(
    spans: InMemorySpanExporter,
) -> None:
    spans.clear()
    backend = InMemoryBackend()
    stream = EventStore(backend).stream(category="orders", stream="o-1")
    await stream.publish(
        [
            NewEvent(name="placed", metadata={"traceparent": 5}),
            NewEvent(name="placed", metadata={"traceparent": ["00-1-2-01"]}),
            NewEvent(name="placed", metadata={"traceparent": "not a context"}),
        ]
    )
    seen: list[int] = []

    async def work(event: StoredEvent) -> None:
        seen.append(event.sequence_number)

    node = EventProcessingNode(backend, node_id="n")
    node.register_subscriber(
        group="g", source=CategoryIdentifier("orders"), processor=tracing.traced(work, group="g")
    )
    async with node:
        await node.wait_caught_up(timeout=timedelta(seconds=10))
    assert len(seen) == 3
    (page,) = spans.get_finished_spans()
    assert page.links == ()


class CountingPropagator(TraceContextTextMapPropagator):
    def __init__(self) -> None:
        self.extracted = 0

    def extract(self, carrier: Any, context: Any = None, getter: Any = default_getter) -> Any:
        self.extracted += 1
        return super().extract(carrier, context, getter)


async def test_each_distinct_trace_context_is_parsed_once_for_the_current_propagator(
    spans: InMemorySpanExporter,
) -> None:
    store = EventStore(InMemoryBackend())
    stream = store.stream(category="orders", stream="o-1")
    for _ in range(2):
        await tracing.publish(stream, [NewEvent(name="placed")] * 3)
    events = await store.category("orders").read()
    before = propagate.get_global_textmap()
    counting = CountingPropagator()
    propagate.set_global_textmap(counting)
    try:
        pages = [events[:2], events[2:4], events[4:]]  # the second holds both publishes
        linked = [[link.context.span_id for link in tracing._links(page)] for page in pages]
    finally:
        propagate.set_global_textmap(before)
    assert counting.extracted == 2
    assert linked[1] == [linked[0][0], linked[2][0]] and linked[0] != linked[2]
    assert tracing._links(events[:1])[0].context.span_id == linked[0][0]  # parsed again


def test_trace_context_is_added_to_copies_sharing_the_checked_payload() -> None:
    payload: JsonObject = {"items": [{"sku": "a", "count": 2}]}
    event = NewEvent(name="placed", payload=payload, metadata={"a": 1, "traceparent": "old"})
    (copy,) = with_added_metadata([event], {"traceparent": "new", "tracestate": "x=1"})
    assert copy.payload is event.payload and copy.payload == payload
    assert copy.metadata == {"a": 1, "traceparent": "new", "tracestate": "x=1"}
    assert event.metadata == {"a": 1, "traceparent": "old"}
    assert (copy.name, copy.occurred_at) == (event.name, event.occurred_at)
    with pytest.raises(InvalidEventError, match=r"metadata\.tracestate"):
        with_added_metadata([event], {"tracestate": "\x00"})


class Pages(EventProcessor):
    """Notes, per page, the span current while its own around_page is entered."""

    def __init__(self) -> None:
        self.entered: list[trace.Span] = []
        self.processed = 0

    async def process_event(self, event: StoredEvent) -> None:
        self.processed += 1

    @contextmanager
    def around_page(self, events: Sequence[StoredEvent]) -> Iterator[None]:
        self.entered.append(trace.get_current_span())
        yield


async def test_a_traced_processor_s_own_page_context_runs_inside_the_page_span(
    spans: InMemorySpanExporter,
) -> None:
    spans.clear()
    backend = InMemoryBackend()
    await (
        EventStore(backend)
        .stream(category="orders", stream="o-1")
        .publish([NewEvent(name="placed")] * 3)
    )
    pages = Pages()
    node = EventProcessingNode(backend, node_id="n")
    node.register_subscriber(
        group="g", source=CategoryIdentifier("orders"), processor=tracing.traced(pages, group="g")
    )
    async with node:
        await node.wait_caught_up(timeout=timedelta(seconds=10))
    (page,) = spans.get_finished_spans()
    assert pages.processed == 3 and len(pages.entered) == 1
    assert pages.entered[0].get_span_context().span_id == (page.context and page.context.span_id)

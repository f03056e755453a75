"""Traces: a publish span whose context travels in the events' metadata, and
processing spans (per event, per transactional batch) linked to it; recorded with the
OpenTelemetry SDK's in-memory exporter."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from eventmill import tracing
from eventmill.backends.base import ConsumerTransaction
from eventmill.backends.memory import InMemoryBackend
from eventmill.conditions import stream_is_empty
from eventmill.consumers.processors import TransactionalEventProcessor
from eventmill.errors import UnmetWriteConditionError
from eventmill.events import CategoryIdentifier, NewEvent, StoredEvent
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

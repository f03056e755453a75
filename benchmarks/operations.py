"""The cost of metrics and tracing: the same work with them off and on, in one run.

- ``operations.drain``: a node draining a category (in memory: 500,000 events, about
  0.2 s: with 100,000, about 40 ms, one of the node's periodic rounds landing in a run
  made it a fifth slower, whatever the mode; PostgreSQL: 50,000), published in traced
  batches of 1,000 so every event carries a trace context, through one subscriber with
  a processor that does nothing.
  ``off``: nothing else; ``metrics``: ``NodeMetrics`` counting lag every 2 s (its
  default) and scraped every second; ``metrics_and_traces``: also ``tracing.traced``
  on the processor (a span per page, linked to the publish spans) with the
  OpenTelemetry SDK recording every span (batched, exporter discarding them).
  ``metrics_and_bare_spans`` (in memory): metrics and a bare SDK span per page (no
  links, attributes or context), the floor under ``tracing.traced``'s cost.
  Events/s of each, from the first event processed to caught up (a node's start-up,
  on PostgreSQL about half a second that varied by as much between runs, was most of a
  10,000-event drain), and the ratio to ``off``.
- ``operations.publish``: single-event publishes to PostgreSQL (1,000), off:
  ``stream.publish``; on: ``tracing.publish`` (a span each, context in the metadata)
  on a backend whose publishes ``PublishMetrics`` counts; ``bare_span``: the same count
  and a plain publish inside a bare SDK span (no attributes, no context written), the
  floor under ``tracing.publish``'s cost.

Modes alternate (in reverse order every other round; garbage collected before each run
and what lives then frozen for it; the spans of each run exported before the next),
medians of 7 runs each; ratios of the medians.
PostgreSQL: ``EVENTMILL_TEST_DSN`` in a throwaway schema per run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry, generate_latest

from benchmarks.common import median, report
from benchmarks.consumers import memory_backend, postgres_backend
from eventmill import tracing
from eventmill.backends.base import Backend
from eventmill.consumers.processors import EventProcessor
from eventmill.events import CategoryIdentifier, NewEvent, StoredEvent
from eventmill.metrics import NodeMetrics, PublishMetrics
from eventmill.node import EventProcessingNode, NodeSettings
from eventmill.store import EventStore

REPEATS = 7


class Discard(SpanExporter):
    """Takes spans and drops them."""

    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def install_tracing() -> None:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    trace.set_tracer_provider(provider)


_first_processed: list[float] = []
"""When the drain running now processed its first event (``drain`` empties it)."""


async def nothing(event: StoredEvent) -> None:
    if not _first_processed:
        _first_processed.append(time.perf_counter())


class BareSpans(EventProcessor):
    """``nothing`` per event and a bare SDK span per page: the SDK's own cost."""

    def __init__(self) -> None:
        self.process_event = nothing  # type: ignore[method-assign]
        self._tracer = trace.get_tracer("bench")

    async def process_event(self, event: StoredEvent) -> None:  # replaced in __init__
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def around_page(self, events: Sequence[StoredEvent]) -> Iterator[None]:
        span = self._tracer.start_span("page")
        try:
            yield
        finally:
            span.end()


async def drain(
    backend: Backend, count: int, *, observed: bool, traced: bool = True, bare: bool = False
) -> float:
    """Events/s of one node draining ``count`` events of ``orders`` from the start,
    timed from its first event processed to caught up (the node's start-up, about half a
    second on PostgreSQL and varying by as much, left out); ``observed``: with metrics,
    and with a span per page if ``traced`` (a bare one if ``bare``)."""
    settings = NodeSettings(poll_interval=timedelta(milliseconds=50), page_size=1000)
    node = EventProcessingNode(backend, node_id="bench", settings=settings)
    group = f"g{time.monotonic_ns()}"
    processor: Any = nothing
    if observed and traced:
        processor = BareSpans() if bare else tracing.traced(nothing, group=group)
    node.register_subscriber(group=group, source=CategoryIdentifier("orders"), processor=processor)
    tasks: list[asyncio.Task[None]] = []
    _first_processed.clear()
    async with node:
        if observed:
            metrics = NodeMetrics(node)  # lag counted every 2 s (the default)
            tasks = [asyncio.create_task(metrics.run()), asyncio.create_task(scrape(metrics))]
        await node.wait_caught_up(timeout=timedelta(minutes=10))
        elapsed = time.perf_counter() - _first_processed[0]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return (count - 1) / elapsed


async def scrape(metrics: NodeMetrics) -> None:
    while True:
        generate_latest(metrics.registry)
        await asyncio.sleep(1.0)


async def publish_rate(backend: Backend, count: int, *, observed: bool, bare: bool) -> float:
    """Single-event publishes/s: plain, or counted and traced (in a bare span if ``bare``)."""
    stream = EventStore(backend).stream(category="single", stream=f"s{time.monotonic_ns()}")
    if observed:
        PublishMetrics(CollectorRegistry()).observe(backend)
    tracer = trace.get_tracer("bench")
    started = time.perf_counter()
    for n in range(count):
        events = [NewEvent(name="happened", payload={"n": n})]
        if not observed:
            await stream.publish(events)
        elif bare:
            span = tracer.start_span("publish")
            try:
                await stream.publish(events)
            finally:
                span.end()
        else:
            await tracing.publish(stream, events)
    return count / (time.perf_counter() - started)


async def compare(
    name: str,
    make: Callable[[], contextlib.AbstractAsyncContextManager[Backend]],
    modes: dict[str, Callable[[Backend], Any]],
    **details: object,
) -> None:
    """Run each mode in turn, REPEATS times; report each median and its ratio to the
    first mode's."""
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    for repeat in range(REPEATS):
        order = list(modes.items())
        for mode, measure in order if repeat % 2 == 0 else reversed(order):
            async with make() as backend:
                # The filled events stay out of the collector's scans: a full collection
                # of the in-memory backend's events would land in whichever run
                # allocated past the threshold, and measure the heap, not the mode.
                gc.collect()
                gc.freeze()
                try:
                    rates[mode].append(await measure(backend))
                finally:
                    gc.unfreeze()
                # Spans still queued for export would be exported during the next run,
                # whatever its mode: an untraced drain after a traced one measured 0.80
                # of another (1.93 against 2.41 million events/s in memory).
                provider = trace.get_tracer_provider()
                assert isinstance(provider, TracerProvider)
                provider.force_flush()
            gc.collect()
    base = median(rates[next(iter(modes))])
    for mode, values in rates.items():
        report(f"{name}.{mode}", median(values), "events/s", **details)
        if mode != next(iter(modes)):
            report(f"{name}.{mode}_over_off", median(values) / base, "ratio", repeats=REPEATS)


def filled(
    make: Callable[[], contextlib.AbstractAsyncContextManager[Any]], count: int
) -> Callable[[], contextlib.AbstractAsyncContextManager[Backend]]:
    @contextlib.asynccontextmanager
    async def backend() -> AsyncIterator[Backend]:
        async with make() as fresh:
            store = EventStore(fresh)
            for batch in range(count // 1_000):
                await tracing.publish(
                    store.stream(category="orders", stream=f"s{batch % 50}"),
                    [NewEvent(name="happened", payload={"n": n}) for n in range(1_000)],
                )
            yield fresh

    return backend


def drainer(count: int, **options: bool) -> Callable[[Backend], Any]:
    async def measure(backend: Backend) -> float:
        return await drain(backend, count, **options)

    return measure


def publisher(count: int, observed: bool, bare: bool = False) -> Callable[[Backend], Any]:
    async def measure(backend: Backend) -> float:
        return await publish_rate(backend, count, observed=observed, bare=bare)

    return measure


async def main() -> None:
    install_tracing()
    for kind, make, count in (
        ("memory", memory_backend, 500_000),
        ("postgres", postgres_backend, 50_000),
    ):
        modes = {
            "off": drainer(count, observed=False),
            "metrics": drainer(count, observed=True, traced=False),
            "metrics_and_traces": drainer(count, observed=True, traced=True),
        }
        if kind == "memory":
            modes["metrics_and_bare_spans"] = drainer(count, observed=True, bare=True)
        await compare(f"operations.drain.{kind}", filled(make, count), modes, events=count)
    await compare(
        "operations.publish.postgres",
        postgres_backend,
        {
            "off": publisher(1_000, False),
            "traced": publisher(1_000, True),
            "bare_span": publisher(1_000, True, bare=True),
        },
        events=1_000,
    )


if __name__ == "__main__":
    asyncio.run(main())

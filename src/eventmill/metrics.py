"""Prometheus metrics of a node (optional extra ``eventmill[metrics]``:
``prometheus_client``, imported only here).

::

    metrics = NodeMetrics(node)            # its own CollectorRegistry
    task = asyncio.create_task(metrics.run())   # refreshes lag every 2 s
    prometheus_client.generate_latest(metrics.registry)

Metrics (labels bounded: group, source identifiers as configured, never a stream of a
category):

- ``eventmill_events_processed_total{group}``, ``eventmill_events_failed_total{group}``
  (times the processor raised for an event: each try), ``eventmill_pass_failures_total{group}``;
- ``eventmill_pass_duration_seconds{group}`` (histogram of subscriber passes) and
  ``eventmill_event_processing_seconds{group}`` (histogram of a pass's time per event);
- ``eventmill_lag_events{group,source}``: events after the holder's place, exact;
  ``eventmill_lag_seconds{group,source}``: age of the oldest of them;
  ``eventmill_catch_up_eta_seconds{group}``: lag over the processing rate of the last
  refresh interval (absent while nothing is processed);
- ``eventmill_sources_held{group}``, ``eventmill_fair_share_sources{group}``,
  ``eventmill_source_changes_total{change}`` (accepted, withdrawn: rebalances),
  ``eventmill_leader`` (0/1), ``eventmill_parked_streams{group}``, ``eventmill_ready``.

Every publish through an ``EventStore`` on the node's backend (``PublishMetrics``,
an ``observe_publishes`` observer; ``PublishMetrics(registry).observe(backend)`` without
a node) adds to ``eventmill_events_published_total{category}``,
``eventmill_publish_failures_total{category}`` and
``eventmill_publish_duration_seconds{category}`` (histogram).

Counters are read from the node when scraped; lag is counted by ``run()`` (one
``EventStorage.lags`` statement per refresh), never during a scrape.

What holds readers back (PostgreSQL; ``EventStorage.read_holdback``, read by ``run()``
too): ``eventmill_watermark_age_seconds``, how long the oldest publish in flight has
held log and category readers back, and ``eventmill_events_beyond_watermark``, the
committed events they wait for behind it (both 0 when none, and in memory).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

from eventmill.backends.base import Backend, ReadHoldback
from eventmill.broker.distributed import DistributedEventBroker
from eventmill.errors import EventmillError, MissingDependencyError
from eventmill.events import EventSourceIdentifier
from eventmill.node import EventProcessingNode, SubscriberHandle
from eventmill.store import observe_publishes

try:
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as missing:  # pragma: no cover - depends on the installation
    raise MissingDependencyError(
        "eventmill metrics need prometheus_client: pip install 'eventmill[metrics]'"
    ) from missing

logger = logging.getLogger(__name__)

PASS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
EVENT_BUCKETS = (0.00001, 0.0001, 0.001, 0.01, 0.1, 1.0)


class NodeMetrics:
    """The metrics of one node in ``registry`` (a new one if None), publishes through
    its backend counted from now on; see the module docstring. ``lag_interval`` is how
    often ``run()`` counts lag."""

    def __init__(
        self,
        node: EventProcessingNode,
        *,
        registry: CollectorRegistry | None = None,
        lag_interval: timedelta = timedelta(seconds=2),
    ) -> None:
        self.node = node
        self.registry = registry if registry is not None else CollectorRegistry()
        self.lag_interval = lag_interval
        self.pass_seconds = Histogram(
            "eventmill_pass_duration_seconds",
            "Duration of subscriber passes that processed events",
            ["group"],
            buckets=PASS_BUCKETS,
            registry=self.registry,
        )
        self.event_seconds = Histogram(
            "eventmill_event_processing_seconds",
            "Processing time per event (a pass's duration over its events)",
            ["group"],
            buckets=EVENT_BUCKETS,
            registry=self.registry,
        )
        self.lags: dict[tuple[str, str], tuple[int, float]] = {}
        """(group, source) -> (events, seconds), as of the latest refresh."""
        self.holdback: ReadHoldback | None = None
        """What held readers back at the latest refresh (None: nothing can)."""
        self.fair_shares: dict[str, int] = {}
        """group -> sources each live subscriber should hold at least."""
        self.rates: dict[str, float] = {}
        """group -> events per second over the latest refresh interval."""
        self._counted: dict[str, tuple[float, int]] = {}
        self._hooked: set[int] = set()
        self.registry.register(_NodeCollector(self))
        PublishMetrics(self.registry).observe(node.backend)

    def hook_passes(self) -> None:
        """Time the passes of subscribers not timed yet (``run()`` calls it)."""
        for handle in self.node.subscribers:
            if id(handle.passes) not in self._hooked:
                self._hooked.add(id(handle.passes))
                handle.passes.on_pass = self._pass_timer(handle.group)

    def _pass_timer(self, group: str) -> _PassTimer:
        return _PassTimer(self.pass_seconds.labels(group), self.event_seconds.labels(group))

    async def refresh(self) -> None:
        """Count the lag of every held source, the fair shares and the rates. Raises
        StorageError."""
        self.hook_passes()
        backend = self.node.backend
        places: list[tuple[str, EventSourceIdentifier, int | None]] = []
        for handle in self.node.subscribers:
            for source in handle.subscriber.sources:
                consumer = handle.subscriber.consumer_of(source)
                places.append(
                    (handle.group, source, None if consumer is None else consumer.processed)
                )
        lags = await backend.events.lags([(source, after, None) for _, source, after in places])
        self.holdback = await backend.events.read_holdback()
        now_wall = time.time()
        found: dict[tuple[str, str], tuple[int, float]] = {}
        for (group, source, _), lag in zip(places, lags, strict=True):
            age = 0.0 if lag.oldest_at is None else max(0.0, now_wall - lag.oldest_at.timestamp())
            found[(group, str(source))] = (lag.events, age)
        self.lags = found
        if isinstance(self.node.broker, DistributedEventBroker):
            groups = {handle.group for handle in self.node.subscribers}
            holdings = await backend.subscriptions.list()
            live = await backend.subscribers.list(
                max_age=self.node.broker.settings.subscriber_manager_subscriber_max_age
            )
            for group in groups:
                sources = sum(1 for h in holdings if h.group == group)
                members = sum(1 for r in live if r.group == group)
                self.fair_shares[group] = sources // members if members else 0
        now = time.monotonic()
        for group, processed in _processed_by_group(self.node.subscribers).items():
            before = self._counted.get(group)
            if before is not None and now > before[0]:
                self.rates[group] = (processed - before[1]) / (now - before[0])
            self._counted[group] = (now, processed)

    async def run(self) -> None:
        """Refresh every ``lag_interval`` until cancelled; a failed refresh is logged
        (once per episode) and retried at the next interval."""
        failing = False
        while True:
            try:
                await self.refresh()
                failing = False
            except EventmillError as error:
                if not failing:
                    logger.warning("metrics: cannot count lag: %s", error)
                failing = True
            await asyncio.sleep(self.lag_interval.total_seconds())

    def holds_fair_share(self) -> bool:
        """Whether every local subscriber holds at least its group's fair share (as of
        the latest refresh)."""
        return all(
            len(handle.subscriber.sources) >= self.fair_shares.get(handle.group, 0)
            for handle in self.node.subscribers
        )

    def lag_exceeds(self, events: int | None, seconds: float | None) -> bool:
        """Whether some group lags more than ``events`` or ``seconds`` (None: no bound)."""
        totals: dict[str, list[float]] = {}
        for (group, _), (count, age) in self.lags.items():
            total = totals.setdefault(group, [0, 0.0])
            total[0] += count
            total[1] = max(total[1], age)
        return any(
            (events is not None and count > events) or (seconds is not None and age > seconds)
            for count, age in totals.values()
        )


class PublishMetrics:
    """Counts and times publishes (a ``PublishObserver``; see the module docstring);
    the metrics live in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter(
            "eventmill_events_published",
            "Events published",
            ["category"],
            registry=registry,
        )
        self.failures = Counter(
            "eventmill_publish_failures",
            "Publishes that raised",
            ["category"],
            registry=registry,
        )
        self.duration = Histogram(
            "eventmill_publish_duration_seconds",
            "Duration of publishes",
            ["category"],
            buckets=PASS_BUCKETS,
            registry=registry,
        )
        self._children: dict[str, tuple[Histogram, Counter]] = {}

    def observe(self, backend: Backend) -> Callable[[], None]:
        """Count the publishes through an ``EventStore`` on ``backend`` until the
        returned function is called."""
        return observe_publishes(backend, self)

    def __call__(self, category: str, events: int, seconds: float, failed: bool) -> None:
        if failed:
            self.failures.labels(category).inc()
            return
        children = self._children.get(category)
        if children is None:
            # labels() costs as much as the observation: each category's once.
            children = self._children.setdefault(
                category, (self.duration.labels(category), self.published.labels(category))
            )
        children[0].observe(seconds)
        children[1].inc(events)


class _PassTimer:
    def __init__(self, passes: Histogram, events: Histogram) -> None:
        self._passes = passes
        self._events = events

    def __call__(self, seconds: float, count: int) -> None:
        if count:
            self._passes.observe(seconds)
            self._events.observe(seconds / count)


def _processed_by_group(handles: list[SubscriberHandle]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for handle in handles:
        totals[handle.group] = totals.get(handle.group, 0) + handle.passes.events_processed
    return totals


class _NodeCollector(Collector):
    def __init__(self, metrics: NodeMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        node = metrics.node
        handles = node.subscribers
        processed = CounterMetricFamily(
            "eventmill_events_processed", "Events processed", labels=["group"]
        )
        for group, count in sorted(_processed_by_group(handles).items()):
            processed.add_metric([group], count)
        yield processed
        failed_events = CounterMetricFamily(
            "eventmill_events_failed",
            "Times the processor raised for an event (each try)",
            labels=["group"],
        )
        failed_by: dict[str, int] = {}
        for handle in handles:
            failed_by[handle.group] = (
                failed_by.get(handle.group, 0) + handle.subscriber.events_failed
            )
        for group, count in sorted(failed_by.items()):
            failed_events.add_metric([group], count)
        yield failed_events
        failures = CounterMetricFamily(
            "eventmill_pass_failures", "Subscriber passes that raised", labels=["group"]
        )
        failed: dict[str, int] = {}
        for handle in handles:
            service = handle.polling.service
            failed[handle.group] = failed.get(handle.group, 0) + getattr(service, "failures", 0)
        for group, count in sorted(failed.items()):
            failures.add_metric([group], count)
        yield failures
        held = GaugeMetricFamily("eventmill_sources_held", "Sources held", labels=["group"])
        parked = GaugeMetricFamily(
            "eventmill_parked_streams", "Streams parked by held sources", labels=["group"]
        )
        held_by: dict[str, int] = {}
        parked_by: dict[str, int] = {}
        for handle in handles:
            held_by[handle.group] = held_by.get(handle.group, 0) + len(handle.subscriber.sources)
            count = 0
            for source in handle.subscriber.sources:
                consumer = handle.subscriber.consumer_of(source)
                count += 0 if consumer is None else len(consumer.parked)
            parked_by[handle.group] = parked_by.get(handle.group, 0) + count
        for group in sorted(held_by):
            held.add_metric([group], held_by[group])
            parked.add_metric([group], parked_by[group])
        yield held
        yield parked
        share = GaugeMetricFamily(
            "eventmill_fair_share_sources",
            "Sources each live subscriber of the group should hold at least",
            labels=["group"],
        )
        for group, value in sorted(metrics.fair_shares.items()):
            share.add_metric([group], value)
        yield share
        lag_events = GaugeMetricFamily(
            "eventmill_lag_events", "Events after the holder's place", labels=["group", "source"]
        )
        lag_seconds = GaugeMetricFamily(
            "eventmill_lag_seconds",
            "Age of the oldest unprocessed event",
            labels=["group", "source"],
        )
        group_lag: dict[str, int] = {}
        for (group, name), (count, age) in sorted(metrics.lags.items()):
            lag_events.add_metric([group, name], count)
            lag_seconds.add_metric([group, name], age)
            group_lag[group] = group_lag.get(group, 0) + count
        yield lag_events
        yield lag_seconds
        eta = GaugeMetricFamily(
            "eventmill_catch_up_eta_seconds",
            "Lag over the latest processing rate",
            labels=["group"],
        )
        for group, lag in sorted(group_lag.items()):
            rate = metrics.rates.get(group, 0.0)
            if lag == 0:
                eta.add_metric([group], 0.0)
            elif rate > 0:
                eta.add_metric([group], lag / rate)
        yield eta
        changes = CounterMetricFamily(
            "eventmill_source_changes",
            "Sources accepted and withdrawn by this node (rebalances)",
            labels=["change"],
        )
        broker = node.broker
        observer = broker.observer if isinstance(broker, DistributedEventBroker) else None
        for change in ("accepted", "withdrawn"):
            changes.add_metric([change], 0 if observer is None else observer.changes[change])
        yield changes
        leader = GaugeMetricFamily("eventmill_leader", "1 while this node coordinates")
        leader.add_metric([], 1 if getattr(broker, "is_leader", True) else 0)
        yield leader
        ready = GaugeMetricFamily("eventmill_ready", "1 while the node is ready")
        ready.add_metric([], 1 if node.ready and metrics.holds_fair_share() else 0)
        yield ready
        holdback = metrics.holdback
        yield GaugeMetricFamily(
            "eventmill_watermark_age_seconds",
            "How long the oldest publish in flight has held readers back (0: none)",
            value=0.0 if holdback is None else holdback.seconds,
        )
        yield GaugeMetricFamily(
            "eventmill_events_beyond_watermark",
            "Committed events readers wait for behind the oldest publish in flight",
            value=0 if holdback is None else holdback.events_beyond,
        )

"""Logging set-up (text and JSON lines with context fields, folded messages), node
metrics (events failed, publishes through any store) and the HTTP endpoints, in
process on the in-memory backend (publish metrics on both)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from eventmill.backends.base import Backend
from eventmill.backends.memory import InMemoryBackend
from eventmill.cluster_status import LagBound
from eventmill.conditions import position_is, stream_is_empty
from eventmill.consumers.failures import FailureAction, FailurePolicy
from eventmill.errors import UnmetWriteConditionError
from eventmill.events import CategoryIdentifier, NewEvent, StoredEvent
from eventmill.http import NodeEndpoints
from eventmill.log_fields import CURRENT_NODE, fields
from eventmill.logs import configure_logging
from eventmill.metrics import PublishMetrics
from eventmill.node import EventProcessingNode
from eventmill.services.error_handlers import ConstantBackoff
from eventmill.store import EventStore


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_context_fields_in_order(root_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream, default_node="fallback")
    log = logging.getLogger("eventmill.test")
    token = CURRENT_NODE.set("node-1")
    try:
        log.info(
            "accepted %s",
            "orders",
            extra=fields(group="g", subscriber="s", source=CategoryIdentifier("orders")),
        )
        log.debug("not shown")
    finally:
        CURRENT_NODE.reset(token)
    try:
        raise ValueError("first line\nsecond line")
    except ValueError:
        log.warning("driver said:\n  line one\n  line two", exc_info=True)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert list(first) == [
        "time",
        "level",
        "logger",
        "node",
        "group",
        "subscriber",
        "source",
        "message",
    ]
    assert first["node"] == "node-1" and first["source"] == "category:orders"
    assert first["message"] == "accepted orders" and first["level"] == "INFO"
    assert second["node"] == "fallback"
    assert second["message"] == "driver said: | line one | line two"
    assert second["error"] == "ValueError: first line | second line"


def test_text_lines_are_one_line_each(root_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("debug", "text", stream=stream)
    logging.getLogger("eventmill.x").info("a\nb", extra=fields(group="g"))
    (line,) = stream.getvalue().splitlines()
    assert line.endswith(" INFO eventmill.x group=g: a | b")


async def ignore(event: StoredEvent) -> None:
    """Processes nothing of interest."""


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


async def test_metrics_and_endpoints_of_a_node() -> None:
    backend = InMemoryBackend()
    store = EventStore(backend)
    node = EventProcessingNode(backend, node_id="n")
    slow = asyncio.Event()

    async def gated(event: StoredEvent) -> None:
        await slow.wait()

    async def rejecting(event: StoredEvent) -> None:
        if event.payload["n"] in (0, 10, 20):
            raise ValueError(f"cannot take {event.payload['n']}")

    node.register_subscriber(group="fast", source=CategoryIdentifier("orders"), processor=ignore)
    node.register_subscriber(group="slow", source=CategoryIdentifier("orders"), processor=gated)
    node.register_subscriber(  # events 0, 10 and 20: tried twice each, then skipped
        group="failing",
        source=CategoryIdentifier("orders"),
        processor=rejecting,
        failure_policy=FailurePolicy(
            max_attempts=2, backoff=ConstantBackoff(), then=FailureAction.SKIP
        ),
    )
    endpoints = NodeEndpoints(node, lag_bound=LagBound(events=10))
    transport = httpx.ASGITransport(app=endpoints)
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
        assert (await client.get("/healthz")).status_code == 503
        async with node:
            for n in range(30):
                await store.stream(category="orders", stream=f"o-{n % 3}").publish(
                    [NewEvent(name="placed", payload={"n": n})]
                )
            deadline = time.monotonic() + 10
            while (await scrape(client)).get(
                ("eventmill_events_processed_total", (("group", "fast"),))
            ) != 30:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            await endpoints.metrics.refresh()
            found = await scrape(client)
            lag = ("eventmill_lag_events", (("group", "slow"), ("source", "category:orders")))
            assert found[lag] == 30
            assert (
                found[("eventmill_lag_events", (("group", "fast"), ("source", "category:orders")))]
                == 0
            )
            assert found[("eventmill_sources_held", (("group", "slow"),))] == 1
            assert found[("eventmill_events_failed_total", (("group", "fast"),))] == 0
            orders = (("category", "orders"),)
            assert found[("eventmill_events_published_total", orders)] == 30
            assert found[("eventmill_publish_duration_seconds_count", orders)] == 30
            assert found[("eventmill_leader", ())] == 1
            assert found[("eventmill_watermark_age_seconds", ())] == 0
            assert (await client.get("/healthz")).status_code == 200
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and "lag above the bound" in ready.text
            slow.set()
            await node.wait_caught_up(timeout=timedelta(seconds=10))
            await endpoints.metrics.refresh()
            assert (await client.get("/readyz")).status_code == 200
            found = await scrape(client)
            assert found[("eventmill_events_processed_total", (("group", "slow"),))] == 30
            assert found[lag] == 0
            assert found[("eventmill_events_failed_total", (("group", "failing"),))] == 6
            assert found[("eventmill_events_failed_total", (("group", "slow"),))] == 0
        assert (await client.get("/healthz")).status_code == 503
        assert (await client.get("/nothing")).status_code == 404


async def test_every_publish_through_a_store_is_counted(backend: Backend) -> None:
    registry = CollectorRegistry()
    stop = PublishMetrics(registry).observe(backend)
    store = EventStore(backend)
    stream = store.stream(category="orders", stream="o-1")
    await stream.publish([NewEvent(name="a"), NewEvent(name="b")])
    await stream.publish([NewEvent(name="c")], condition=position_is(1))
    with pytest.raises(UnmetWriteConditionError):
        await stream.publish([NewEvent(name="d")], condition=stream_is_empty())
    await (
        EventStore(backend)
        .stream(category="payments", stream="p-1")
        .publish([NewEvent(name="paid")])
    )
    stop()
    await stream.publish([NewEvent(name="not counted")])
    found = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    orders = (("category", "orders"),)
    assert found[("eventmill_events_published_total", orders)] == 3
    assert found[("eventmill_publish_failures_total", orders)] == 1
    assert found[("eventmill_publish_duration_seconds_count", orders)] == 2
    assert found[("eventmill_events_published_total", (("category", "payments"),))] == 1

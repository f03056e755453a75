"""Logging set-up (text and JSON lines with context fields, folded messages), node
metrics and the HTTP endpoints, in process on the in-memory backend."""

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

from eventmill.backends.memory import InMemoryBackend
from eventmill.cluster_status import LagBound
from eventmill.conditions import position_is, stream_is_empty
from eventmill.errors import UnmetWriteConditionError
from eventmill.events import CategoryIdentifier, NewEvent, StoredEvent
from eventmill.http import NodeEndpoints
from eventmill.log_fields import CURRENT_NODE, fields
from eventmill.logs import configure_logging
from eventmill.metrics import PublishMetrics
from eventmill.node import EventProcessingNode
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

    node.register_subscriber(group="fast", source=CategoryIdentifier("orders"), processor=ignore)
    node.register_subscriber(group="slow", source=CategoryIdentifier("orders"), processor=gated)
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
            assert found[("eventmill_leader", ())] == 1
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
        assert (await client.get("/healthz")).status_code == 503
        assert (await client.get("/nothing")).status_code == 404


async def test_publish_metrics_count_events_and_failures() -> None:
    registry = CollectorRegistry()
    metrics = PublishMetrics(registry)
    stream = EventStore(InMemoryBackend()).stream(category="orders", stream="o-1")
    await metrics.publish(stream, [NewEvent(name="a"), NewEvent(name="b")])
    await metrics.publish(stream, [NewEvent(name="c")], condition=position_is(1))
    with pytest.raises(UnmetWriteConditionError):
        await metrics.publish(stream, [NewEvent(name="d")], condition=stream_is_empty())
    found = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    labels = (("category", "orders"),)
    assert found[("eventmill_events_published_total", labels)] == 3
    assert found[("eventmill_publish_failures_total", labels)] == 1
    assert found[("eventmill_publish_duration_seconds_count", labels)] == 2

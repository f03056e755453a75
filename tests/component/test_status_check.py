"""``eventmill status`` as a check: exact, uncapped lag (25,000 pending events), the
leader and its term, every node, what holds readers back (an open publish: named, and
the committed events behind it counted in the lag), and exit codes 0 (healthy), 1 (no
live coordinator, dead holder, unheld source, lag above ``--fail-on-lag``, readers held
back too long) and 2 (cannot check)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from eventmill.backends.base import Assign, Backend, Release
from eventmill.backends.memory import InMemoryBackend
from eventmill.backends.postgres import PostgresBackend
from eventmill.cli import EXIT_CANNOT_CHECK, main, status
from eventmill.cluster_status import LagBound, gather_cluster_status
from eventmill.errors import InvalidSettingsError
from eventmill.events import CategoryIdentifier, NewEvent
from eventmill.metrics import NodeMetrics
from eventmill.node import EventProcessingNode
from eventmill.store import EventStore
from tests.postgres_support import TEST_DSN, fresh_postgres_backend, open_publish

PENDING = 25_000
ORDERS = CategoryIdentifier("orders")


async def publish(backend: Backend, count: int) -> None:
    store = EventStore(backend)
    for batch in range(count // 500):
        events = [NewEvent(name="placed", payload={"n": n}) for n in range(500)]
        await store.stream(category="orders", stream=f"order-{batch}").publish(events)


async def make_cluster(backend: Backend, *, holder_mode: str = "both") -> None:
    """One node holding ``orders`` for group ``totals``, as the broker records it."""
    await backend.subscribers.register("totals", "s1", "node-a", [ORDERS])
    await backend.subscriptions.apply(
        [Assign(group="totals", source=ORDERS, subscriber_id="s1", node_id="node-a", epoch=1)]
    )
    await backend.nodes.heartbeat("node-a", holder_mode, leader_term=None)
    await backend.nodes.heartbeat("node-c", "coordinator", leader_term=3)


@pytest.fixture
async def postgres() -> AsyncIterator[PostgresBackend]:
    async with fresh_postgres_backend() as backend:
        yield backend


async def check(
    backend: PostgresBackend, capsys: pytest.CaptureFixture[str], *options: str
) -> tuple[int, dict[str, Any]]:
    bound = LagBound.parse(options[0]) if options else None
    code = await status(TEST_DSN, backend.schema, True, bound)
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.postgres
async def test_exact_lag_for_25000_pending_events_and_the_exit_codes(
    postgres: PostgresBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    await publish(postgres, PENDING + 500)
    first = await postgres.events.read(ORDERS, after=None, limit=500)
    await make_cluster(postgres)
    await postgres.checkpoints.save(
        "totals", ORDERS, first[-1].sequence_number, expected_version=None, epoch=1
    )

    code, found = await check(postgres, capsys)
    assert code == 0, found["warnings"]
    (source,) = found["sources"]
    assert source["lag_events"] == PENDING
    assert source["holder_alive"] is True and source["node_id"] == "node-a"
    assert 0 <= source["lag_seconds"] < 600
    assert found["leader"] == "node-c" and found["leader_term"] == 3
    assert [(n["node_id"], n["mode"]) for n in found["nodes"]] == [
        ("node-a", "both"),
        ("node-c", "coordinator"),
    ]
    assert found["schema_version"] == await postgres.schema_version()

    code, found = await check(postgres, capsys, str(PENDING - 1))
    assert code == 1
    assert found["warnings"][0].startswith(f"group totals: lag {PENDING} events, ")
    code, found = await check(postgres, capsys, str(PENDING))
    assert code == 0
    code, found = await check(postgres, capsys, "0.0s")
    assert code == 1 and "above the bound" in found["warnings"][0]
    code, found = await check(postgres, capsys, "3600s")
    assert code == 0


@pytest.mark.postgres
async def test_no_live_coordinator_and_a_dead_holder_are_warnings(
    postgres: PostgresBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    await make_cluster(postgres, holder_mode="observer")
    await postgres.nodes.remove("node-c")
    code, found = await check(postgres, capsys)
    assert code == 1
    assert found["leader"] is None
    assert found["warnings"] == [
        "no live coordinator: no node in mode coordinator or both is alive, so sources "
        "of stopped nodes stay unheld"
    ]
    async with postgres.connection() as connection:
        await connection.execute(
            postgres.sql("UPDATE {schema}.subscribers SET last_seen = now() - interval '1 min'")
        )
    await postgres.nodes.heartbeat("node-c", "coordinator", leader_term=1)
    code, found = await check(postgres, capsys)
    assert code == 1
    assert found["warnings"] == [
        "group totals: 1 sources held by dead subscribers (e.g. s1 on node-a)"
    ]


@pytest.mark.postgres
async def test_an_open_publish_is_named_and_the_events_behind_it_count_as_lag(
    postgres: PostgresBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    await make_cluster(postgres)
    await publish(postgres, 500)
    async with open_publish(postgres, "stuck-publisher") as (pid, xid):
        await publish(postgres, 1000)  # committed, but behind the open publish
        assert len(await postgres.events.read(ORDERS, after=None, limit=5000)) == 500

        code, found = await check(postgres, capsys)
        assert code == 0, found["warnings"]
        holdback = found["read_holdback"]
        assert holdback["events_beyond"] == 1000
        assert holdback["oldest"]["pid"] == pid
        assert holdback["oldest"]["transaction_id"] == xid
        assert holdback["oldest"]["application_name"] == "stuck-publisher"
        assert holdback["oldest"]["state"] == "idle in transaction"
        assert found["sources"][0]["lag_events"] == 1500

        metrics = NodeMetrics(EventProcessingNode(postgres, node_id="watching"))
        await metrics.refresh()
        scraped = {
            sample.name: sample.value
            for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
            for sample in family.samples
        }
        assert scraped["eventmill_watermark_age_seconds"] > 0
        assert scraped["eventmill_events_beyond_watermark"] == 1000

        code, found = await check(postgres, capsys, "0.0s")
        assert code == 1
        (held,) = [w for w in found["warnings"] if w.startswith("reads held back")]
        assert f"pid {pid}, xid {xid}, application_name 'stuck-publisher'" in held
        assert held.endswith("1000 committed events wait behind it")

        assert await status(TEST_DSN, postgres.schema, False) == 0
        (line,) = [x for x in capsys.readouterr().out.splitlines() if "read watermark" in x]
        assert f"pid {pid}, xid {xid}" in line and "1000 committed events beyond it" in line

    code, found = await check(postgres, capsys)
    assert code == 0, found["warnings"]
    assert found["read_holdback"]["oldest"] is None
    assert found["read_holdback"]["events_beyond"] == 0


async def test_unheld_sources_and_memory_backlog() -> None:
    backend = InMemoryBackend()
    await publish(backend, 1500)
    await make_cluster(backend)
    await backend.subscribers.register("totals", "s2", "node-a", [CategoryIdentifier("other")])
    await backend.subscriptions.apply(
        [
            Assign(
                group="totals",
                source=CategoryIdentifier("other"),
                subscriber_id="s2",
                node_id="node-a",
                epoch=1,
            )
        ]
    )
    await backend.subscriptions.apply(
        [Release(group="totals", source=CategoryIdentifier("other"), subscriber_id="s2", epoch=1)]
    )
    found = await gather_cluster_status(backend)
    assert sorted(s.lag_events for s in found.sources) == [0, 1500]
    assert found.groups[0].lag_events == 1500
    assert found.warnings == ("group totals: 1 sources unheld",)
    assert found.read_holdback is None


def test_lag_bounds() -> None:
    assert LagBound.parse("1000") == LagBound(events=1000)
    assert LagBound.parse("30s") == LagBound(seconds=30.0)
    for bad in ("", "-1", "1.5", "10m", "s"):
        with pytest.raises(InvalidSettingsError):
            LagBound.parse(bad)


def test_cannot_connect_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["status", "--dsn", "postgresql://postgres@127.0.0.1:1/none"])
    assert code == EXIT_CANNOT_CHECK
    assert capsys.readouterr().err.startswith("eventmill: cannot connect")

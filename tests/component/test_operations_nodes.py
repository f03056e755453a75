"""Three ``eventmill run --http-port --log-format json`` processes on a private
PostgreSQL cluster (it is stopped and started here): ``/metrics`` parsed with
``prometheus_client.parser`` against exact published and processed counts, lag in
events and seconds while a group is held back, ``/readyz`` failing while a node has
lost all its sources (its database traffic delayed past the max age while it runs and
answers; frozen past the max age) and while the database is down, then passing again,
``/healthz`` passing throughout, and the JSON log lines of the assignment change and
of the outage parsed and checked. The second node reaches the database through a
``DelayProxy``."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from eventmill.backends.postgres import PostgresBackend
from eventmill.cli import main
from eventmill.events import NewEvent
from eventmill.store import EventStore
from tests.delay_proxy import DelayProxy, proxy_in_thread
from tests.harness.eventmill_process import start_eventmill
from tests.servers import PrivateCluster, free_port

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

EVENTS = 300
NODES = ("ops-1", "ops-2", "ops-3")


class Node:
    """One ``eventmill run`` process, its HTTP port and its stderr lines."""

    def __init__(self, node_id: str, dsn: str, hold: Path) -> None:
        self.node_id = node_id
        self.port = free_port()
        self.lines: list[str] = []
        self.process = start_eventmill(
            "run",
            "tests.component.operations_app:make_node",
            "--node-id",
            node_id,
            "--http-port",
            str(self.port),
            "--log-format",
            "json",
            env={"EVENTMILL_DSN": dsn, "EVENTMILL_TEST_HOLD": str(hold)},
            stdout=subprocess.DEVNULL,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError:
            return 0, ""

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, text = self.get("/metrics")
        if status != 200:
            return {}
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in list(self.lines)]


def value(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def total(nodes: list[Node], name: str, **labels: str) -> float:
    """``name`` summed over the nodes and over labels not given."""
    result = 0.0
    for node in nodes:
        for (metric, metric_labels), sample in node.metrics().items():
            if metric == name and set(labels.items()) <= set(metric_labels):
                result += sample
    return result


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


@pytest.fixture
def cluster() -> Iterator[PrivateCluster]:
    private = PrivateCluster.create({"max_connections": "100"})
    yield private
    private.remove()


async def publish(dsn: str, count: int) -> None:
    backend = await PostgresBackend.connect(dsn, max_size=2)
    try:
        store = EventStore(backend)
        for n in range(count):
            await store.stream(category="orders", stream=f"order-{n % 30}").publish(
                [NewEvent(name="placed", payload={"n": n})]
            )
    finally:
        await backend.close()


def test_three_nodes_metrics_readiness_and_logs(cluster: PrivateCluster, tmp_path: Path) -> None:
    with proxy_in_thread("127.0.0.1", cluster.port) as proxy:
        check_three_nodes(cluster, proxy, tmp_path)


def check_three_nodes(cluster: PrivateCluster, proxy: DelayProxy, tmp_path: Path) -> None:
    dsn = cluster.dsn()
    assert main(["migrate", "--dsn", dsn]) == 0
    hold = tmp_path / "hold"
    proxied = dsn.replace(f"port={cluster.port}", f"port={proxy.port}")
    nodes = [Node(node_id, proxied if node_id == "ops-2" else dsn, hold) for node_id in NODES]
    try:
        # Settled: every node ready, holding its share of each group's 4 partitions.
        def settled() -> bool:
            found = [node.metrics() for node in nodes]
            return all(node.get("/readyz")[0] == 200 for node in nodes) and all(
                sorted(value(f, "eventmill_sources_held", group=group) for f in found) == [1, 1, 2]
                for group in ("fast", "slow")
            )

        wait_until(settled, "the nodes hold 1, 1 and 2 partitions of each group", 60)
        assert total(nodes, "eventmill_leader") == 1

        # Hold the slow group back, publish, and read exact counts and lag.
        hold.touch()
        asyncio.run(publish(dsn, EVENTS))
        wait_until(
            lambda: total(nodes, "eventmill_events_processed_total", group="fast") == EVENTS,
            "the fast group processed every event",
        )
        wait_until(
            lambda: total(nodes, "eventmill_lag_events", group="slow") == EVENTS,
            "the slow group's lag counts every event",
        )
        # Lag is sampled every few seconds: a sample taken before the last events
        # were processed may still be showing.
        wait_until(
            lambda: total(nodes, "eventmill_lag_events", group="fast") == 0,
            "the fast group's lag falls to 0",
        )
        ages = [
            sample
            for node in nodes
            for (name, labels), sample in node.metrics().items()
            if name == "eventmill_lag_seconds" and ("group", "slow") in labels
        ]
        assert len(ages) == 4 and all(age > 0 for age in ages)
        hold.unlink()
        wait_until(
            lambda: total(nodes, "eventmill_lag_events", group="slow") == 0,
            "the slow group caught up",
        )
        assert total(nodes, "eventmill_events_processed_total", group="slow") == EVENTS
        assert total(nodes, "eventmill_events_processed_total", group="fast") == EVENTS
        assert total(nodes, "eventmill_pass_failures_total") == 0

        # A node whose statements arrive 3 s late (past the 1.5 s max age) loses all
        # its sources while it runs and answers: not ready but alive; then ready.
        lagging = nodes[1]
        proxy.delay = 3.0
        try:
            wait_until(
                lambda: (
                    [
                        total([nodes[0], nodes[2]], "eventmill_sources_held", group=group)
                        for group in ("fast", "slow")
                    ]
                    == [4, 4]
                ),
                "the lagging node's sources moved to the others",
            )
            wait_until(lambda: lagging.get("/readyz")[0] == 503, "the lagging node is not ready")
            assert lagging.get("/healthz")[0] == 200
        finally:
            proxy.delay = 0.0
        wait_until(settled, "the lagging node holds its share again", 60)

        # A node frozen past the max age loses its sources: not ready, then ready.
        frozen = nodes[2]
        others = nodes[:2]
        frozen.process.send_signal(signal.SIGSTOP)
        try:
            wait_until(
                lambda: total(others, "eventmill_sources_held", group="fast") == 4,
                "the frozen node's sources moved",
            )
        finally:
            frozen.process.send_signal(signal.SIGCONT)
        wait_until(lambda: frozen.get("/readyz")[0] == 503, "the woken node is not ready")
        assert frozen.get("/healthz")[0] == 200
        wait_until(settled, "the woken node holds its share again")

        records = [record for node in nodes for record in node.records()]
        accepted = [r for r in records if r["message"].startswith("accepted ")]
        moved = [r for r in accepted if r["node"] in ("ops-1", "ops-2") and r["group"] == "fast"]
        assert moved, accepted
        assert {"time", "level", "logger", "node", "group", "subscriber", "source"} <= set(
            moved[-1]
        )
        assert moved[-1]["subscriber"] == f"fast@{moved[-1]['node']}"
        assert moved[-1]["source"].startswith("partition:orders/")
        assert any(r["message"].startswith("assigned ") and "group" in r for r in records)
        assert any(r["message"].startswith("coordinator: leading (term") for r in records)

        # The database goes away: not ready, still alive; back: ready again.
        cluster.stop()
        try:
            wait_until(
                lambda: all(node.get("/readyz")[0] == 503 for node in nodes),
                "no node is ready without the database",
            )
            assert all(node.get("/healthz")[0] == 200 for node in nodes)
        finally:
            cluster.start()
        wait_until(settled, "every node is ready again")
        wait_until(
            lambda: any("recovered after" in r["message"] for n in nodes for r in n.records()),
            "a recovered line",
        )
        for node in nodes:
            failures = [r for r in node.records() if r["level"] == "WARNING"]
            loops = {r["message"].split(":")[0] for r in failures if "round failed" in r["message"]}
            per_loop = {
                loop: sum(1 for r in failures if r["message"].startswith(loop + ":"))
                for loop in loops
            }
            assert all(count <= 2 for count in per_loop.values()), per_loop
    finally:
        if hold.exists():
            hold.unlink()
        for node in nodes:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGCONT)
                node.process.send_signal(signal.SIGTERM)
        codes = []
        for node in nodes:
            try:
                codes.append(node.process.wait(timeout=30))
            except subprocess.TimeoutExpired:
                node.process.kill()
                codes.append(node.process.wait())
            node.reader.join(timeout=5)
            assert node.process.stderr is not None
            node.process.stderr.close()
    assert codes == [0, 0, 0], [node.lines[-3:] for node in nodes]

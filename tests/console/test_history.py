"""The console's history (pure): rebalances and leadership changes found between two
reads, each with its reason; the lag window keeps only the last minutes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from eventmill.console.cluster import ClusterState
from eventmill.console.history import ClusterHistory, changes_between

START = datetime(2026, 1, 1, tzinfo=UTC)


def source(key: str, node: str | None, state: str = "assigned", epoch: int = 1) -> dict[str, Any]:
    return {
        "key": key,
        "source": key,
        "subscriber_id": None if node is None else f"g@{node}",
        "node_id": node,
        "state": state,
        "epoch": epoch,
        "lag": 0,
    }


def read(
    seconds: float,
    sources: list[dict[str, Any]],
    alive: dict[str, float],
    leader: str | None = "n1",
    lag: int = 0,
) -> ClusterState:
    """A read at START + ``seconds``: group g with ``sources`` and subscribers g@<node>
    whose heartbeat ages are ``alive`` (older than 5 s: dead)."""
    subscribers = [
        {"id": f"g@{node}", "node_id": node, "heartbeat_age": age, "alive": age <= 5}
        for node, age in alive.items()
    ]
    group = {"group": "g", "subscribers": subscribers, "sources": sources, "lag": lag}
    return ClusterState(
        read_at=START + timedelta(seconds=seconds),
        database_seconds=0.0,
        leader=None if leader is None else {"node_id": leader},
        nodes=[],
        groups=[{**group, "lag_seconds": 0.0}],
        warnings=[],
    )


def kinds(changes: list[dict[str, Any]]) -> list[tuple[str, str | None, str | None, str]]:
    return [(c["kind"], c["from_node"], c["to_node"], c["reason"]) for c in changes]


def test_a_dead_holders_source_taken_over() -> None:
    before = read(0, [source("a", "n1"), source("b", "n2")], {"n1": 0.1, "n2": 0.1})
    after = read(1, [source("a", "n1"), source("b", "n1", epoch=2)], {"n1": 0.1, "n2": 6.0})
    assert kinds(changes_between(before, after)) == [
        ("taken over", "n2", "n1", "holder dead: no heartbeat for 6.0 s")
    ]
    gone = read(1, [source("a", "n1"), source("b", "n1", epoch=2)], {"n1": 0.1})
    assert kinds(changes_between(before, gone)) == [
        ("taken over", "n2", "n1", "holder gone without releasing")
    ]


def test_a_handover_is_revoked_released_then_assigned() -> None:
    alive = {"n1": 0.1, "n2": 0.1}
    held = read(0, [source("a", "n1")], alive)
    revoking = read(1, [source("a", "n1", state="revoking")], alive)
    released = read(2, [source("a", None, state="released")], alive)
    assigned = read(3, [source("a", "n2", epoch=2)], alive)
    assert kinds(changes_between(held, revoking)) == [
        ("revoked", "n1", None, "rebalance: handed over next")
    ]
    assert kinds(changes_between(revoking, revoking)) == []
    assert kinds(changes_between(revoking, released)) == [
        ("released", "n1", None, "revoked by the coordinator")
    ]
    assert kinds(changes_between(released, assigned)) == [
        ("assigned", None, "n2", "unheld source given out")
    ]
    stopped = read(2, [source("a", None, state="released")], {"n2": 0.1})
    assert kinds(changes_between(held, stopped)) == [("released", "n1", None, "holder stopped")]


def test_leadership_changes() -> None:
    alive = {"n1": 0.1}
    assert kinds(changes_between(read(0, [], alive), read(1, [], alive, leader=None))) == [
        ("leader", "n1", None, "no coordinator")
    ]
    assert kinds(changes_between(read(0, [], alive), read(1, [], alive, leader="n2"))) == [
        ("leader", "n1", "n2", "leadership taken")
    ]


def test_the_lag_window_keeps_the_last_minutes() -> None:
    history = ClusterHistory(window=timedelta(seconds=10), max_changes=2)
    for second in range(30):
        history.add(read(second, [], {"n1": 0.1}, lag=second))
    samples = dict(history.samples())["g"]
    assert [lag for _, lag, _ in samples] == list(range(19, 30))
    assert history.latest is not None and history.latest.read_at == START + timedelta(seconds=29)

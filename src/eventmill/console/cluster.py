"""What the console shows, read from storage in a few round trips: nodes, the leader,
groups with their sources, holders, epochs, checkpoints and lag, parked streams, and
warnings.

``read_cluster`` returns plain data (``ClusterState``), ready for JSON; it blocks on
the storage and raises StorageError when a read fails.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from eventmill.backends.base import Backend, HoldingState
from eventmill.broker.coordinator import COORDINATOR_LOCK
from eventmill.events import EventSourceIdentifier, source_key

APPLICATION_PREFIX = "eventmill:"
"""A connection whose application_name is ``eventmill:<node id>`` belongs to that node:
the console names the leader by it (otherwise by its server session)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsoleSettings:
    """How the console judges what it reads.

    - ``subscriber_max_age``: a subscriber (and a node) silent longer than this is dead,
      as the coordinator judges (the nodes' ``subscriber_manager_subscriber_max_age``);
    - ``lag_warning_events`` / ``lag_warning_seconds``: a group lagging more than either
      bound is warned about;
    - ``coordinator_lock``: the name of the lock the leader holds.
    """

    subscriber_max_age: timedelta = timedelta(seconds=5)
    lag_warning_events: int = 10_000
    lag_warning_seconds: float = 60.0
    coordinator_lock: str = COORDINATOR_LOCK


@dataclass(slots=True, kw_only=True)
class ClusterState:
    """One read of the cluster, as plain data (``to_json``)."""

    read_at: datetime
    database_seconds: float
    """Wall time spent waiting on the storage for this read."""
    leader: dict[str, Any] | None
    nodes: list[dict[str, Any]]
    groups: list[dict[str, Any]]
    warnings: list[str]
    parked: list[dict[str, Any]] = field(default_factory=list)
    """Parked streams: each group's streams held back after a failure."""
    checkpoints: dict[tuple[str, str], int | None] = field(default_factory=dict)
    """(group, source key) -> checkpoint, for throughput between two reads."""

    def to_json(self) -> dict[str, Any]:
        return {
            "read_at": self.read_at.isoformat(),
            "database_ms": round(self.database_seconds * 1000, 1),
            "leader": self.leader,
            "nodes": self.nodes,
            "groups": self.groups,
            "warnings": self.warnings,
            "parked": self.parked,
        }


def _leader_node(application_name: str | None) -> str | None:
    if application_name and application_name.startswith(APPLICATION_PREFIX):
        return application_name.removeprefix(APPLICATION_PREFIX)
    return None


async def read_cluster(
    backend: Backend, settings: ConsoleSettings, previous: ClusterState | None = None
) -> ClusterState:
    """Read the cluster's state from ``backend``; with the ``previous`` read, each
    group's throughput since then (events its checkpoints moved past, per second).
    Raises StorageError."""
    started = time.perf_counter()
    holder = await backend.locks.holder(settings.coordinator_lock)
    records = await backend.subscribers.list()
    holdings = await backend.subscriptions.list()
    checkpoints = {(c.group, source_key(c.source)): c for c in await backend.checkpoints.list()}
    places: list[tuple[EventSourceIdentifier, int | None]] = []
    for holding in holdings:
        checkpoint = checkpoints.get((holding.group, source_key(holding.source)))
        places.append((holding.source, None if checkpoint is None else checkpoint.after))
    # (group, index of the place now, index of the place at the previous read)
    moved: list[tuple[str, int, int]] = []
    if previous is not None:
        for index, holding in enumerate(holdings):
            place = (holding.group, source_key(holding.source))
            if place in previous.checkpoints and places[index][1] != previous.checkpoints[place]:
                moved.append((holding.group, index, len(places)))
                places.append((holding.source, previous.checkpoints[place]))
    lags = await backend.events.lags(places)
    parked = await backend.parked.list()
    database_seconds = time.perf_counter() - started
    now = datetime.now(UTC)
    max_age = settings.subscriber_max_age.total_seconds()

    leader: dict[str, Any] | None = None
    leader_node: str | None = None
    if holder is not None:
        leader_node = _leader_node(holder.application_name)
        leader = {
            "node_id": leader_node,
            "session": holder.session,
            "application_name": holder.application_name,
        }

    nodes: dict[str, dict[str, Any]] = {}
    subscribers: dict[tuple[str, str], dict[str, Any]] = {}
    groups: dict[str, dict[str, Any]] = {}

    def group_entry(name: str) -> dict[str, Any]:
        return groups.setdefault(
            name,
            {
                "group": name,
                "subscribers": [],
                "sources": [],
                "lag": 0,
                "lag_seconds": 0.0,
                "throughput": None,
            },
        )

    for record in records:
        age = max(0.0, (now - record.last_seen).total_seconds())
        alive = age <= max_age
        entry = {"id": record.id, "node_id": record.node_id, "heartbeat_age": round(age, 2)}
        entry["alive"] = alive
        subscribers[(record.group, record.id)] = entry
        group_entry(record.group)["subscribers"].append(entry)
        node = nodes.setdefault(
            record.node_id,
            {"node_id": record.node_id, "subscribers": 0, "sources": 0, "heartbeat_age": age},
        )
        node["subscribers"] += 1
        node["heartbeat_age"] = round(min(node["heartbeat_age"], age), 2)
    for group_name, _ in checkpoints:
        group_entry(group_name)
    if leader_node is not None and leader_node not in nodes:
        nodes[leader_node] = {
            "node_id": leader_node,
            "subscribers": 0,
            "sources": 0,
            "heartbeat_age": None,
        }

    warnings: list[str] = []
    unheld = dead_held = 0
    state_checkpoints: dict[tuple[str, str], int | None] = {}
    for holding, lag in zip(holdings, lags[: len(holdings)], strict=True):
        key = source_key(holding.source)
        checkpoint = checkpoints.get((holding.group, key))
        after = None if checkpoint is None else checkpoint.after
        state_checkpoints[(holding.group, key)] = after
        owner = subscribers.get((holding.group, holding.subscriber_id or ""))
        seconds = 0.0 if lag.oldest_at is None else max(0.0, (now - lag.oldest_at).total_seconds())
        if holding.state is HoldingState.RELEASED:
            unheld += 1
        elif owner is None or not owner["alive"]:
            dead_held += 1
        if holding.node_id is not None and holding.node_id in nodes:
            nodes[holding.node_id]["sources"] += 1
        group = group_entry(holding.group)
        group["sources"].append(
            {
                "key": key,
                "source": str(holding.source),
                "subscriber_id": holding.subscriber_id,
                "node_id": holding.node_id,
                "holder_alive": owner is not None and owner["alive"],
                "state": holding.state.value,
                "epoch": holding.epoch,
                "checkpoint": after,
                "lag": lag.events,
                "lag_seconds": round(seconds, 2),
            }
        )
        group["lag"] += lag.events
        group["lag_seconds"] = round(max(group["lag_seconds"], seconds), 2)

    if previous is not None:
        interval = max((now - previous.read_at).total_seconds(), 1e-3)
        processed = dict.fromkeys(groups, 0)
        for name, index, before in moved:
            processed[name] += max(0, lags[before].events - lags[index].events)
        for name, group in groups.items():
            group["throughput"] = round(processed[name] / interval, 1)
    for node in nodes.values():
        age = node["heartbeat_age"]
        node["leader"] = node["node_id"] == leader_node
        node["health"] = "unknown" if age is None else "alive" if age <= max_age else "dead"
    parked_streams = [
        {
            "group": record.group,
            "source": str(record.source),
            "stream": record.stream.stream,
            "category": record.stream.category,
            "event_name": record.event_name,
            "sequence_number": record.sequence_number,
            "position": record.position,
            "held": record.held,
            "attempts": record.attempts,
            "error": f"{record.error_type}: {record.error_message}".splitlines()[0],
            "since": record.first_failed_at.isoformat(),
            "request": None if record.request is None else record.request.value,
        }
        for record in parked
    ]
    if leader is None:
        warnings.append("no coordinator alive: nobody holds the coordinator lock")
    if unheld:
        warnings.append(f"{unheld} unheld sources")
    if dead_held:
        warnings.append(f"{dead_held} sources held by dead or unknown subscribers")
    if parked_streams:
        warnings.append(f"{len(parked_streams)} parked streams")
    for group in groups.values():
        if group["lag"] > settings.lag_warning_events:
            warnings.append(
                f"group {group['group']} lags {group['lag']} events "
                f"(bound {settings.lag_warning_events})"
            )
        elif group["lag_seconds"] > settings.lag_warning_seconds:
            warnings.append(
                f"group {group['group']} lags {group['lag_seconds']:.0f} s "
                f"(bound {settings.lag_warning_seconds:.0f} s)"
            )
    return ClusterState(
        read_at=now,
        database_seconds=database_seconds,
        leader=leader,
        nodes=sorted(nodes.values(), key=lambda node: node["node_id"]),
        groups=[groups[name] for name in sorted(groups)],
        warnings=warnings,
        parked=parked_streams,
        checkpoints=state_checkpoints,
    )

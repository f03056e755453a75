"""What the console shows, read from storage in a few round trips: nodes, the leader,
groups with their sources, holders, epochs, checkpoints and lag, parked streams, what
holds readers back (the read watermark, the oldest publish in flight and the committed
events behind it; PostgreSQL), and warnings.

``read_cluster`` returns plain data (``ClusterState``), ready for JSON; it blocks on
the storage and raises StorageError when a read fails.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from eventmill.backends.base import Backend, HoldingState, LagPlace, SourceLag
from eventmill.broker.coordinator import COORDINATOR_LOCK
from eventmill.cluster_status import HELD_BACK_WARNING, held_back_warning
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
    - ``coordinator_lock``: the name of the lock the leader holds;
    - ``count_changes_above``: a source lagging more than this many events has its lag
      counted from what changed since the previous read; the others are counted from
      their checkpoint every read (as cheap for a small backlog, and exact at once);
    - ``held_back_warning_seconds``: an open publish holding readers back for longer
      is warned about.
    """

    subscriber_max_age: timedelta = timedelta(seconds=5)
    lag_warning_events: int = 10_000
    lag_warning_seconds: float = 60.0
    coordinator_lock: str = COORDINATOR_LOCK
    count_changes_above: int = 10_000
    held_back_warning_seconds: float = HELD_BACK_WARNING.total_seconds()


@dataclass(frozen=True, slots=True)
class Count:
    """A source's lag as counted: ``lag`` events after ``checkpoint`` through
    ``counted_through`` (places as for reads; None: the start)."""

    checkpoint: int | None
    counted_through: int | None
    lag: int


RECOUNT_EVERY = 60
"""Reads between two full counts of a source's lag (staggered over the sources); in
between only what arrived and what was processed is counted."""


@dataclass(slots=True)
class _LagReading:
    """One holding's places in the lag statement, and what they found."""

    key: tuple[str, str]
    checkpoint: int | None
    base: Count | None
    places: list[int] = field(default_factory=list)


def _plan_counts(
    holdings: list[tuple[str, str, EventSourceIdentifier, int | None]],
    previous: ClusterState | None,
    places: list[LagPlace],
    count_changes_above: int,
) -> list[_LagReading]:
    """Add each holding's places to ``places``: from scratch, (checkpoint, end) when
    its lag is at most ``count_changes_above``, once every RECOUNT_EVERY reads, when
    new, or after its checkpoint moved back; otherwise
    what arrived (counted_through, end), what was processed (old checkpoint, new
    checkpoint] and where the first unprocessed event is (checkpoint, checkpoint]. A
    recounted source whose checkpoint moved on also gets (old checkpoint, checkpoint],
    for throughput."""
    serial = 0 if previous is None else previous.serial + 1
    readings = []
    for index, (group, key, source, checkpoint) in enumerate(holdings):
        base = None if previous is None else previous.counts.get((group, key))
        before = None if base is None else base.checkpoint
        moved_on = (
            base is not None and checkpoint is not None and (before is None or checkpoint > before)
        )
        if base is not None and (
            base.lag <= count_changes_above
            or (index + serial) % RECOUNT_EVERY == 0
            or (
                base.checkpoint is not None and (checkpoint is None or checkpoint < base.checkpoint)
            )
        ):
            base = None
        reading = _LagReading(key=(group, key), checkpoint=checkpoint, base=base)
        if base is None:
            reading.places.append(len(places))
            places.append((source, checkpoint, None))
            if moved_on:  # what it processed since the previous read, for throughput
                reading.places.append(len(places))
                places.append((source, before, checkpoint))
        else:
            reading.places += [len(places), len(places) + 1]
            places.append((source, base.counted_through, None))
            places.append((source, checkpoint, checkpoint))
            if checkpoint != base.checkpoint:
                reading.places.append(len(places))
                places.append((source, base.checkpoint, checkpoint))
        readings.append(reading)
    return readings


def _counted(reading: _LagReading, lags: list[SourceLag]) -> tuple[Count, int, datetime | None]:
    """The holding's new count, the events processed since the previous read, and when
    its first unprocessed event was stored."""
    first = lags[reading.places[0]]
    if reading.base is None:
        through = reading.checkpoint if first.newest is None else first.newest
        processed = lags[reading.places[1]].events if len(reading.places) > 1 else 0
        return Count(reading.checkpoint, through, first.events), processed, first.oldest_at
    arrived, oldest = first, lags[reading.places[1]].oldest_at
    processed = lags[reading.places[2]].events if len(reading.places) > 2 else 0
    through = reading.base.counted_through if arrived.newest is None else arrived.newest
    lag = max(0, reading.base.lag + arrived.events - processed)
    return Count(reading.checkpoint, through, lag), processed, None if lag == 0 else oldest


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
    read_holdback: dict[str, Any] | None = None
    """What holds readers back (``ReadHoldback.to_json``); None: nothing can."""
    counts: dict[tuple[str, str], Count] = field(default_factory=dict)
    """(group, source key) -> what was counted, so the next read counts only changes."""
    serial: int = 0
    """This read's number (0, 1, ...): staggers the full recounts."""

    def to_json(self) -> dict[str, Any]:
        return {
            "read_at": self.read_at.isoformat(),
            "database_ms": round(self.database_seconds * 1000, 1),
            "leader": self.leader,
            "nodes": self.nodes,
            "groups": self.groups,
            "warnings": self.warnings,
            "parked": self.parked,
            "read_holdback": self.read_holdback,
        }


def _leader_node(application_name: str | None) -> str | None:
    if application_name and application_name.startswith(APPLICATION_PREFIX):
        return application_name.removeprefix(APPLICATION_PREFIX)
    return None


async def read_cluster(
    backend: Backend, settings: ConsoleSettings, previous: ClusterState | None = None
) -> ClusterState:
    """Read the cluster's state from ``backend``. With the ``previous`` read, lags are
    counted from what changed since (``_plan_counts``) and each group's throughput is
    the events its checkpoints moved past since then, per second. Raises StorageError."""
    started = time.perf_counter()
    # The reads are independent: concurrent, on connections of the pool, so a refresh
    # waits for the slowest rather than for their sum. Lags need holdings and places.
    holder, node_records, records, holdings, checkpoints, parked = await asyncio.gather(
        backend.locks.holder(settings.coordinator_lock),
        backend.nodes.list(),
        backend.subscribers.list(),
        backend.subscriptions.list(),
        backend.checkpoints.places(),
        backend.parked.list(),
    )
    planned = []
    for holding in holdings:
        key = source_key(holding.source)
        planned.append((holding.group, key, holding.source, checkpoints.get((holding.group, key))))
    places: list[LagPlace] = []
    readings = _plan_counts(planned, previous, places, settings.count_changes_above)
    lags, holdback = await asyncio.gather(
        backend.events.lags(places), backend.events.read_holdback()
    )
    database_seconds = time.perf_counter() - started
    now = datetime.now(UTC)
    max_age = settings.subscriber_max_age.total_seconds()

    nodes: dict[str, dict[str, Any]] = {}
    for node_record in node_records:
        age = max(0.0, (now - node_record.last_seen).total_seconds())
        nodes[node_record.node_id] = {
            "node_id": node_record.node_id,
            "mode": node_record.mode,
            "subscribers": 0,
            "sources": 0,
            "heartbeat_age": round(age, 2),
            "term": node_record.leader_term,
        }
    # The leader: the live node whose record says it leads (latest term start), else
    # the node named by the coordinator lock's session.
    leading = [
        r
        for r in node_records
        if r.leader_term is not None and nodes[r.node_id]["heartbeat_age"] <= max_age
    ]
    elected = max(leading, key=lambda r: r.leader_since or now, default=None)
    leader: dict[str, Any] | None = None
    leader_node: str | None = None
    if elected is not None or holder is not None:
        if elected is not None:
            leader_node = elected.node_id
        elif holder is not None:
            leader_node = _leader_node(holder.application_name)
        leader = {
            "node_id": leader_node,
            "term": None if elected is None else elected.leader_term,
            "since": None
            if elected is None or elected.leader_since is None
            else elected.leader_since.isoformat(),
            "session": None if holder is None else holder.session,
        }

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
            {
                "node_id": record.node_id,
                "mode": "unknown",
                "subscribers": 0,
                "sources": 0,
                "heartbeat_age": round(age, 2),
                "term": None,
            },
        )
        node["subscribers"] += 1
    for group_name, _ in checkpoints:
        group_entry(group_name)
    if leader_node is not None and leader_node not in nodes:
        nodes[leader_node] = {
            "node_id": leader_node,
            "mode": "unknown",
            "subscribers": 0,
            "sources": 0,
            "heartbeat_age": None,
            "term": None,
        }

    warnings: list[str] = []
    unheld = dead_held = 0
    counts: dict[tuple[str, str], Count] = {}
    processed = dict.fromkeys(groups, 0)
    for holding, reading in zip(holdings, readings, strict=True):
        key = reading.key[1]
        count, moved_past, oldest_at = _counted(reading, lags)
        counts[reading.key] = count
        after = count.checkpoint
        owner = subscribers.get((holding.group, holding.subscriber_id or ""))
        seconds = 0.0 if oldest_at is None else max(0.0, (now - oldest_at).total_seconds())
        if holding.state is HoldingState.RELEASED:
            unheld += 1
        elif owner is None or not owner["alive"]:
            dead_held += 1
        if holding.node_id is not None and holding.node_id in nodes:
            nodes[holding.node_id]["sources"] += 1
        group = group_entry(holding.group)
        processed[holding.group] = processed.get(holding.group, 0) + moved_past
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
                "lag": count.lag,
                "lag_seconds": round(seconds, 2),
            }
        )
        group["lag"] += count.lag
        group["lag_seconds"] = round(max(group["lag_seconds"], seconds), 2)

    if previous is not None:
        interval = max((now - previous.read_at).total_seconds(), 1e-3)
        for name, group in groups.items():
            group["throughput"] = round(processed.get(name, 0) / interval, 1)
    for name, group in groups.items():
        group["processed"] = processed.get(name, 0)
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
    held_back = held_back_warning(holdback, settings.held_back_warning_seconds)
    if held_back is not None:
        warnings.append(held_back)
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
        read_holdback=None if holdback is None else holdback.to_json(),
        counts=counts,
        serial=0 if previous is None else previous.serial + 1,
    )

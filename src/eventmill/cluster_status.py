"""The state of a whole deployment, read from its storage: ``gather_cluster_status``.

What ``eventmill status`` prints and what an operations console shows: the leader and
its term, every node (coordinator-only ones too), the schema version, each source's
holder, checkpoint and lag (exact event counts, one ``EventStorage.lags`` call, and
the age of the oldest unprocessed event: events committed behind an open publish
count too), parked streams, what holds readers back (the read watermark, the oldest
publish in flight and the committed events waiting behind it; PostgreSQL), and
warnings:

- no live coordinator (sources of a stopped node then stay unheld);
- sources that nobody holds in a group that has live subscribers;
- sources held by a subscriber that is dead (not seen within the max age);
- groups lagging more than a bound (events or seconds), when one is given;
- parked streams;
- an open publish holding readers back for longer than HELD_BACK_WARNING (or the lag
  bound in seconds, when one is given and is shorter): every log and category reader
  of the schema waits for it.

Everything returned is plain data (frozen dataclasses; ``to_json()`` for JSON).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from eventmill.backends.base import Backend, LagPlace, ReadHoldback
from eventmill.errors import InvalidSettingsError

DEFAULT_MAX_AGE = timedelta(seconds=5)
"""A node or subscriber not seen for longer is dead (the broker's default max age)."""

HELD_BACK_WARNING = timedelta(seconds=30)
"""An open publish holding readers back for longer is warned about: a publish is one
short statement, so one open this long was left open (or its session is stuck)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LagBound:
    """Lag above which a group is reported: in events, in seconds, or both."""

    events: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str) -> LagBound:
        """``"1000"`` (events) or ``"30s"`` (seconds); raises InvalidSettingsError."""
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s?)\s*", text)
        if match is None:
            raise InvalidSettingsError(f"a lag bound is N (events) or Ns (seconds), not {text!r}")
        if match.group(2):
            return cls(seconds=float(match.group(1)))
        if "." in match.group(1):
            raise InvalidSettingsError(f"a lag bound in events is a whole number, not {text!r}")
        return cls(events=int(match.group(1)))

    def exceeded(self, events: int, seconds: float) -> bool:
        """Whether a lag of ``events`` whose oldest is ``seconds`` old is above it."""
        return (self.events is not None and events > self.events) or (
            self.seconds is not None and seconds > self.seconds
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeStatus:
    """One node: mode, liveness, leadership and its subscribers (``group/id``)."""

    node_id: str
    mode: str
    alive: bool
    seconds_since_seen: float | None
    leader_term: int | None
    subscribers: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceStatus:
    """One (group, source): who holds it, its checkpoint and its lag."""

    group: str
    source: dict[str, Any]
    state: str
    epoch: int
    subscriber_id: str | None
    node_id: str | None
    holder_alive: bool
    checkpoint: int | None
    lag_events: int
    lag_seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupStatus:
    """One group: live subscribers, sources, total lag and parked streams."""

    group: str
    live_subscribers: int
    sources: int
    lag_events: int
    lag_seconds: float
    parked_streams: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterStatus:
    """See the module docstring. ``healthy`` is True when there is no warning."""

    checked_at: datetime
    schema_version: int | None
    leader: str | None
    leader_term: int | None
    leader_since: datetime | None
    nodes: tuple[NodeStatus, ...]
    groups: tuple[GroupStatus, ...]
    sources: tuple[SourceStatus, ...]
    read_holdback: ReadHoldback | None
    """What holds log and category readers back (None: nothing can, in memory)."""
    warnings: tuple[str, ...]

    @property
    def healthy(self) -> bool:
        return not self.warnings

    def to_json(self) -> dict[str, Any]:
        """The status as JSON-ready data (times as ISO 8601 text)."""
        data: dict[str, Any] = dataclasses.asdict(self)
        for key in ("checked_at", "leader_since"):
            value = data[key]
            data[key] = None if value is None else value.isoformat()
        data["read_holdback"] = None if self.read_holdback is None else self.read_holdback.to_json()
        data["healthy"] = self.healthy
        return data


async def gather_cluster_status(
    backend: Backend,
    *,
    max_age: timedelta = DEFAULT_MAX_AGE,
    lag_bound: LagBound | None = None,
) -> ClusterStatus:
    """Read the deployment's state from ``backend`` (see the module docstring). Blocks
    for one count per source; raises StorageError, SchemaError."""
    now = datetime.now(UTC)
    limit = max_age.total_seconds()
    node_records = await backend.nodes.list()
    subscribers = await backend.subscribers.list()
    holdings = await backend.subscriptions.list()
    checkpoints = {(c.group, c.source): c for c in await backend.checkpoints.list()}
    parked = await backend.parked.list()
    version = await backend.schema_version()
    holdback = await backend.events.read_holdback()

    seen = {(r.group, r.id): (now - r.last_seen).total_seconds() for r in subscribers}
    live = {key for key, age in seen.items() if age <= limit}
    by_node: dict[str, list[str]] = {}
    for record in subscribers:
        by_node.setdefault(record.node_id, []).append(f"{record.group}/{record.id}")
    nodes: dict[str, NodeStatus] = {}
    for node in node_records:
        age = (now - node.last_seen).total_seconds()
        nodes[node.node_id] = NodeStatus(
            node_id=node.node_id,
            mode=node.mode,
            alive=age <= limit,
            seconds_since_seen=round(age, 3),
            leader_term=node.leader_term if age <= limit else None,
            subscribers=tuple(by_node.pop(node.node_id, [])),
        )
    for node_id, names in by_node.items():  # subscribers of a node without a record
        nodes[node_id] = NodeStatus(
            node_id=node_id,
            mode="unknown",
            alive=any(tuple(name.split("/", 1)) in live for name in names),
            seconds_since_seen=None,
            leader_term=None,
            subscribers=tuple(names),
        )
    leaders = [
        record
        for record in node_records
        if record.leader_term is not None and nodes[record.node_id].alive
    ]
    leader = max(leaders, key=lambda r: r.leader_since or now, default=None)

    places: list[LagPlace] = []
    for holding in holdings:
        checkpoint = checkpoints.get((holding.group, holding.source))
        places.append((holding.source, None if checkpoint is None else checkpoint.after, None))
    lags = await backend.events.lags(places)
    sources: list[SourceStatus] = []
    for holding, (_, after, _), lag in zip(holdings, places, lags, strict=True):
        oldest = lag.oldest_at
        sources.append(
            SourceStatus(
                group=holding.group,
                source=holding.source.to_json(),
                state=holding.state.value,
                epoch=holding.epoch,
                subscriber_id=holding.subscriber_id,
                node_id=holding.node_id,
                holder_alive=(holding.group, holding.subscriber_id or "") in live,
                checkpoint=after,
                lag_events=lag.events,
                lag_seconds=0.0 if oldest is None else round((now - oldest).total_seconds(), 3),
            )
        )

    group_names = sorted(
        {g for g, _ in seen} | {h.group for h in holdings} | {p.group for p in parked}
    )
    groups = [
        _group_status(name, live, sources, sum(1 for p in parked if p.group == name))
        for name in group_names
    ]
    warnings = _warnings(list(nodes.values()), groups, sources, lag_bound)
    bound = HELD_BACK_WARNING.total_seconds()
    if lag_bound is not None and lag_bound.seconds is not None:
        bound = min(bound, lag_bound.seconds)
    warning = held_back_warning(holdback, bound)
    if warning is not None:
        warnings.append(warning)
    return ClusterStatus(
        checked_at=now,
        schema_version=version,
        leader=None if leader is None else leader.node_id,
        leader_term=None if leader is None else leader.leader_term,
        leader_since=None if leader is None else leader.leader_since,
        nodes=tuple(sorted(nodes.values(), key=lambda n: n.node_id)),
        groups=tuple(groups),
        sources=tuple(sources),
        read_holdback=holdback,
        warnings=tuple(warnings),
    )


def held_back_warning(holdback: ReadHoldback | None, bound: float) -> str | None:
    """The warning about an open publish holding readers back for longer than
    ``bound`` seconds, else None."""
    if holdback is None or holdback.oldest is None or holdback.seconds <= bound:
        return None
    return (
        f"reads held back {holdback.seconds:.1f} s by an open publish "
        f"({describe_publisher(holdback)}); "
        f"{holdback.events_beyond} committed events wait behind it"
    )


def describe_publisher(holdback: ReadHoldback) -> str:
    """The oldest publish in flight in one line: pid, xid, application_name, state (or
    its gid when prepared); 'none' when there is none."""
    oldest = holdback.oldest
    if oldest is None:
        return "none"
    if oldest.prepared_as is not None:
        return f"prepared transaction {oldest.prepared_as!r}, xid {oldest.transaction_id}"
    return (
        f"pid {oldest.pid}, xid {oldest.transaction_id}, "
        f"application_name {oldest.application_name!r}, {oldest.state}"
    )


def _group_status(
    name: str, live: set[tuple[str, str]], sources: list[SourceStatus], parked: int
) -> GroupStatus:
    mine = [s for s in sources if s.group == name]
    return GroupStatus(
        group=name,
        live_subscribers=sum(1 for group, _ in live if group == name),
        sources=len(mine),
        lag_events=sum(s.lag_events for s in mine),
        lag_seconds=max((s.lag_seconds for s in mine), default=0.0),
        parked_streams=parked,
    )


def _warnings(
    nodes: Sequence[NodeStatus],
    groups: Sequence[GroupStatus],
    sources: Sequence[SourceStatus],
    lag_bound: LagBound | None,
) -> list[str]:
    found: list[str] = []
    if nodes and not any(n.alive and n.mode in ("coordinator", "both") for n in nodes):
        found.append(
            "no live coordinator: no node in mode coordinator or both is alive, so "
            "sources of stopped nodes stay unheld"
        )
    for group in groups:
        unheld = [s for s in sources if s.group == group.group and s.subscriber_id is None]
        if unheld and group.live_subscribers:
            found.append(f"group {group.group}: {len(unheld)} sources unheld")
        dead = [
            s
            for s in sources
            if s.group == group.group and s.subscriber_id is not None and not s.holder_alive
        ]
        if dead:
            found.append(
                f"group {group.group}: {len(dead)} sources held by dead subscribers "
                f"(e.g. {dead[0].subscriber_id} on {dead[0].node_id})"
            )
        if lag_bound is not None and lag_bound.exceeded(group.lag_events, group.lag_seconds):
            found.append(
                f"group {group.group}: lag {group.lag_events} events, "
                f"oldest {group.lag_seconds:.1f} s, above the bound"
            )
        if group.parked_streams:
            found.append(f"group {group.group}: {group.parked_streams} parked streams")
    return found

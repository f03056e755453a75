"""What the console remembers between reads: each group's lag over the last minutes, and
the rebalances and leadership changes found by comparing two successive reads.

Pure: no I/O, no clock (times come from the reads).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from eventmill.console.cluster import ClusterState

Change = dict[str, Any]
"""One rebalance or leadership change, as plain data: ``at``, ``kind`` (assigned,
revoked, released, taken over, leader), ``group``, ``source``, ``from_node``,
``to_node``, ``epoch`` and ``reason``."""


def _holders(state: ClusterState) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (group["group"], source["key"]): source
        for group in state.groups
        for source in group["sources"]
    }


def _alive_subscribers(state: ClusterState) -> set[tuple[str, str]]:
    return {
        (group["group"], subscriber["id"])
        for group in state.groups
        for subscriber in group["subscribers"]
        if subscriber["alive"]
    }


def _heartbeat_ages(state: ClusterState) -> dict[tuple[str, str], float]:
    return {
        (group["group"], subscriber["id"]): subscriber["heartbeat_age"]
        for group in state.groups
        for subscriber in group["subscribers"]
    }


def changes_between(before: ClusterState, after: ClusterState) -> list[Change]:
    """The changes of holdings and leadership from ``before`` to ``after``, oldest
    first, each with the reason the reads show: a source moving from a holder that was
    dead (or gone without releasing it) was taken over; one revoked from a live holder
    is being rebalanced; a source given to someone after being released was assigned."""
    at = after.read_at.isoformat()
    changes: list[Change] = []
    old_leader = None if before.leader is None else before.leader["node_id"]
    new_leader = None if after.leader is None else after.leader["node_id"]
    if (before.leader is None) != (after.leader is None) or old_leader != new_leader:
        changes.append(
            {
                "at": at,
                "kind": "leader",
                "group": None,
                "source": None,
                "from_node": old_leader,
                "to_node": new_leader,
                "epoch": None,
                "reason": "no coordinator" if after.leader is None else "leadership taken",
            }
        )
    old = _holders(before)
    alive_after = _alive_subscribers(after)
    ages = _heartbeat_ages(after)
    for (group, key), source in _holders(after).items():
        previous = old.get((group, key))
        was_holder = None if previous is None else previous["subscriber_id"]
        holder = source["subscriber_id"]
        change: Change = {
            "at": at,
            "group": group,
            "source": source["source"],
            "from_node": None if previous is None else previous["node_id"],
            "to_node": source["node_id"],
            "epoch": source["epoch"],
        }
        if previous is not None and was_holder == holder and previous["state"] == source["state"]:
            continue
        if source["state"] == "revoking":
            if previous is not None and previous["state"] == "revoking":
                continue
            change.update(kind="revoked", to_node=None, reason="rebalance: handed over next")
        elif source["state"] == "released":
            if was_holder is None:
                continue
            gone = (group, was_holder) not in alive_after
            change.update(
                kind="released",
                to_node=None,
                reason="holder stopped" if gone else "revoked by the coordinator",
            )
        elif was_holder is None or (previous is not None and previous["state"] == "released"):
            change.update(kind="assigned", reason="unheld source given out")
        elif was_holder != holder:
            age = ages.get((group, was_holder))
            change.update(
                kind="taken over",
                reason="holder gone without releasing"
                if age is None
                else f"holder dead: no heartbeat for {age:.1f} s",
            )
        else:
            change.update(kind="assigned", reason="handover completed")
        changes.append(change)
    return changes


class ClusterHistory:
    """The lag of each group over the last ``window`` and the latest ``max_changes``
    changes, fed one read at a time."""

    def __init__(self, *, window: timedelta = timedelta(minutes=5), max_changes: int = 200):
        self.window = window
        self.lag: dict[str, deque[tuple[str, int, float]]] = {}
        """group -> (read time, lag in events, lag in seconds), oldest first."""
        self.changes: deque[Change] = deque(maxlen=max_changes)
        self.latest: ClusterState | None = None

    def add(self, state: ClusterState) -> list[Change]:
        """Record ``state`` (the next read); return the changes since the previous one."""
        found = [] if self.latest is None else changes_between(self.latest, state)
        self.changes.extend(found)
        self.latest = state
        oldest = state.read_at - self.window
        stamp = state.read_at.isoformat()
        for entry in state.groups:
            samples = self.lag.setdefault(entry["group"], deque())
            samples.append((stamp, entry["lag"], entry["lag_seconds"]))
        for name, samples in list(self.lag.items()):
            while samples and datetime.fromisoformat(samples[0][0]) < oldest:
                samples.popleft()
            if not samples:
                del self.lag[name]
        return found

    def samples(self) -> Iterator[tuple[str, list[tuple[str, int, float]]]]:
        """Each group's lag samples."""
        for group, samples in self.lag.items():
            yield group, list(samples)

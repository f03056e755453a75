"""NodeStateStore contract, on every backend: heartbeats create and refresh records,
leader_since holds for one term, remove and purge delete."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from eventmill.backends.base import Backend


async def test_heartbeats_keep_leader_since_within_a_term(backend: Backend) -> None:
    nodes = backend.nodes
    assert await nodes.list() == []
    await nodes.heartbeat("b", "observer", leader_term=None)
    await nodes.heartbeat("a", "both", leader_term=1)
    first = {record.node_id: record for record in await nodes.list()}
    assert list(first) == ["a", "b"]
    assert first["a"].leader_term == 1 and first["a"].leader_since is not None
    assert first["b"].leader_term is None and first["b"].leader_since is None
    await asyncio.sleep(0.01)  # distinct now() for the next statement
    await nodes.heartbeat("a", "both", leader_term=1)
    again = {record.node_id: record for record in await nodes.list()}
    assert again["a"].leader_since == first["a"].leader_since
    assert again["a"].last_seen > first["a"].last_seen
    assert again["a"].started_at == first["a"].started_at
    await nodes.heartbeat("a", "both", leader_term=2)
    later = {record.node_id: record for record in await nodes.list()}
    assert later["a"].leader_since is not None and first["a"].leader_since is not None
    assert later["a"].leader_since > first["a"].leader_since
    await nodes.heartbeat("a", "both", leader_term=None)
    assert [r.leader_since for r in await nodes.list()] == [None, None]


async def test_remove_and_purge(backend: Backend) -> None:
    nodes = backend.nodes
    await nodes.heartbeat("a", "coordinator", leader_term=None)
    await nodes.heartbeat("b", "observer", leader_term=None)
    await nodes.remove("a")
    await nodes.remove("a")
    assert [r.node_id for r in await nodes.list()] == ["b"]
    assert await nodes.purge(timedelta(minutes=1)) == 0
    await asyncio.sleep(0.01)
    assert await nodes.purge(timedelta(0)) == 1
    assert await nodes.list() == []

"""SubscriberStateStore.heartbeat_all (the subscriber manager's one call per round),
on every backend: it refreshes, re-creates and updates like ``heartbeat``."""

from __future__ import annotations

import pytest

from eventmill import CategoryIdentifier, InvalidIdentifierError, StreamIdentifier
from eventmill.backends.base import Backend

ORDERS = (CategoryIdentifier("orders"),)
ONE = (StreamIdentifier("orders", "o-1"),)


async def test_heartbeat_all_refreshes_recreates_and_keeps_registrations(
    backend: Backend,
) -> None:
    store = backend.subscribers
    first = await store.register("totals", "a", "node-1", ORDERS)
    await store.register("totals", "gone", "node-1", ORDERS)
    await store.remove("totals", "gone")
    await store.heartbeat_all(
        "node-2", [("totals", "a", ONE), ("totals", "gone", ORDERS), ("audit", "x", ORDERS)]
    )
    records = {(r.group, r.id): r for r in await store.list()}
    assert set(records) == {("totals", "a"), ("totals", "gone"), ("audit", "x")}
    refreshed = records["totals", "a"]
    assert refreshed.registered_at == first.registered_at
    assert refreshed.last_seen >= first.last_seen
    assert refreshed.node_id == "node-2"
    assert refreshed.subscription_requests == ONE
    assert records["totals", "gone"].subscription_requests == ORDERS


async def test_heartbeat_all_of_nobody_does_nothing_and_bad_names_fail(backend: Backend) -> None:
    await backend.subscribers.heartbeat_all("node-1", [])
    assert await backend.subscribers.list() == []
    with pytest.raises(InvalidIdentifierError):
        await backend.subscribers.heartbeat_all("node-1", [("totals", "\x00", ORDERS)])
    assert await backend.subscribers.list() == []

"""Heartbeats on PostgreSQL are HOT updates: no index covers ``last_seen`` and the
subscribers table keeps room in its pages, so a heartbeat leaves no dead index entries
behind (migration 0010). Measured in a database of its own: old row versions are
pruned only once no transaction of the same database may still see them, and other
tests' transactions in the shared one would hold that back."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from eventmill import CategoryIdentifier
from eventmill.backends.postgres import PostgresBackend
from tests.postgres_support import own_database

pytestmark = pytest.mark.postgres

SUBSCRIBERS = 20
ROUNDS = 50


async def test_heartbeats_are_hot_updates() -> None:
    async with own_database() as dsn:
        backend = await PostgresBackend.connect(dsn, schema="eventmill")
        try:
            await backend.install_schema()
            await heartbeat_and_check(backend, dsn)
        finally:
            await backend.close()


async def heartbeat_and_check(backend: PostgresBackend, dsn: str) -> None:
    """Heartbeat ``SUBSCRIBERS`` records ``ROUNDS`` times; check the HOT share."""
    requests = (CategoryIdentifier("orders"),)
    entries = [("totals", f"sub-{n}", requests) for n in range(SUBSCRIBERS)]
    for group, id, _ in entries:
        await backend.subscribers.register(group, id, "node-a", requests)
    for _ in range(ROUNDS):
        await backend.subscribers.heartbeat_all("node-a", entries)
    await backend.subscribers.close()  # its sessions end, so their statistics are sent
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        deadline = time.monotonic() + 30
        while True:
            cursor = await connection.execute(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                " WHERE schemaname = %s AND relname = 'subscribers'",
                (backend.schema,),
            )
            row = await cursor.fetchone()
            assert row is not None
            updates, hot = row
            if updates >= SUBSCRIBERS * ROUNDS:
                break
            assert time.monotonic() < deadline, f"statistics show {updates} updates"
            await asyncio.sleep(0.2)
            await connection.execute("SELECT pg_stat_clear_snapshot()")
    print(f"HOT updates: {hot} of {updates} ({hot / updates:.3f})")
    assert hot / updates >= 0.9

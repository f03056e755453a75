"""A backend's pool after the database was away: on the test's own cluster, which is
stopped and started again."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from eventmill.backends.postgres import PostgresBackend
from eventmill.errors import StorageError
from tests.servers import PrivateCluster

pytestmark = pytest.mark.postgres

OUTAGE = 4.0
"""Seconds the server stays down while requests keep failing."""


async def test_the_pool_reconnects_once_the_server_is_back(own_cluster: PrivateCluster) -> None:
    """psycopg_pool retries a lost connection after 1, 2, 4, 8 ... s: uncapped, a pool
    that lost its connections in an outage still waited for its next attempt seconds
    after the server came back (as long again as the outage, at worst). The first
    request after the server is back must get a connection within its own timeout."""
    backend = await PostgresBackend.connect(
        own_cluster.dsn(), connect_timeout=timedelta(seconds=1.5)
    )
    try:
        await asyncio.to_thread(own_cluster.stop)
        stopped = time.monotonic()
        failed = 0
        while time.monotonic() - stopped < OUTAGE:
            with pytest.raises(StorageError):
                async with backend.connection() as connection:
                    await connection.execute("SELECT 1")
            failed += 1
        await asyncio.to_thread(own_cluster.start)
        async with backend.connection() as connection:
            await connection.execute("SELECT 1")
        assert failed >= 2
    finally:
        await backend.close()

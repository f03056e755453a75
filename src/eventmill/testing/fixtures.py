"""The fixtures of the eventmill pytest plugin (``eventmill.testing.pytest_plugin``),
each fresh per test:

- ``eventmill_memory_backend``: an ``InMemoryBackend``, closed after the test;
- ``eventmill_postgres_backend``: a ``PostgresBackend`` in a new schema of the database
  named by ``--eventmill-dsn`` or the ``EVENTMILL_TEST_DSN`` environment variable,
  installed, and dropped after the test (the test is skipped when neither is set);
- ``eventmill_node``: an ``EventProcessingNode`` over ``eventmill_memory_backend``,
  running, with a 50 ms poll interval; register subscribers on it, publish, then
  ``await eventmill_node.wait_caught_up()``. Stopped after the test.

Async fixtures run on pytest-asyncio's loop (``asyncio_mode = "auto"`` or mark the
tests ``@pytest.mark.asyncio``). Hypothesis strategies are in
``eventmill.testing.strategies``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio

from eventmill.backends.memory import InMemoryBackend
from eventmill.node import EventProcessingNode, NodeMode, NodeSettings

if TYPE_CHECKING:
    from eventmill.backends.postgres import PostgresBackend

DSN_VARIABLE = "EVENTMILL_TEST_DSN"


@pytest_asyncio.fixture
async def eventmill_memory_backend() -> AsyncIterator[InMemoryBackend]:
    """A fresh in-memory backend."""
    backend = InMemoryBackend()
    try:
        yield backend
    finally:
        await backend.close()


@pytest_asyncio.fixture
async def eventmill_postgres_backend(
    request: pytest.FixtureRequest,
) -> AsyncIterator[PostgresBackend]:
    """A PostgreSQL backend in a new schema, dropped after the test."""
    from eventmill.backends.postgres import PostgresBackend

    dsn = request.config.getoption("--eventmill-dsn") or os.environ.get(DSN_VARIABLE)
    if not dsn:
        pytest.skip(f"no PostgreSQL: pass --eventmill-dsn or set {DSN_VARIABLE}")
    schema = f"eventmill_test_{secrets.token_hex(6)}"
    backend = await PostgresBackend.connect(dsn, schema=schema, max_size=4)
    try:
        await backend.install_schema()
        yield backend
    finally:
        try:
            async with backend.connection() as connection:
                await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await backend.close()


@pytest_asyncio.fixture
async def eventmill_node(
    eventmill_memory_backend: InMemoryBackend,
) -> AsyncIterator[EventProcessingNode]:
    """A running node over the in-memory backend; stopped after the test."""
    node = EventProcessingNode(
        eventmill_memory_backend,
        mode=NodeMode.BOTH,
        node_id="test-node",
        settings=NodeSettings(poll_interval=timedelta(milliseconds=50)),
    )
    async with node:
        yield node

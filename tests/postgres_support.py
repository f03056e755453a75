"""PostgreSQL test helpers: a backend in a schema of its own, dropped afterwards."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from eventmill.backends.postgres import PostgresBackend
from eventmill.events import stream_hash

TEST_DSN = os.environ.get("EVENTMILL_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def unique_schema_name() -> str:
    """A schema name no other test run uses."""
    return f"em_test_{secrets.token_hex(6)}"


async def connect() -> psycopg.AsyncConnection[Any]:
    """A new autocommit connection to the test database (close it yourself)."""
    return await psycopg.AsyncConnection.connect(TEST_DSN, autocommit=True)


_DROP_ATTEMPTS = 5
"""Deadlocks a schema drop survives (see ``drop_schema``)."""


async def drop_schema(schema: str) -> None:
    """Drop ``schema`` and everything in it, if it exists. A statement of a killed node
    process runs on in the server until it ends (a trigger's sleep, say), and the drop,
    locking the schema's tables one by one, can deadlock with it: the drop is tried
    again (the other session goes on once this attempt is rolled back)."""
    statement = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
    async with await connect() as connection:
        for attempts_left in reversed(range(_DROP_ATTEMPTS)):
            try:
                await connection.execute(statement)
                return
            except psycopg.errors.DeadlockDetected:
                if not attempts_left:
                    raise


async def wait_for_lock_wait(dsn: str, query_like: str, within: float = 30.0) -> None:
    """Return once a session of ``dsn``'s database waits for a lock while running a
    query that matches ``query_like`` (SQL LIKE); fail after ``within`` seconds."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as watcher:
        deadline = time.monotonic() + within
        while True:
            cursor = await watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database() AND query LIKE %s",
                (query_like,),
            )
            row = await cursor.fetchone()
            if row is not None and row[0] > 0:
                return
            assert time.monotonic() < deadline, f"nothing like {query_like!r} waited"
            await asyncio.sleep(0.02)


@asynccontextmanager
async def fresh_postgres_backend(
    *, max_size: int = 4, install: bool = True
) -> AsyncIterator[PostgresBackend]:
    """A PostgresBackend on a small pool (closed afterwards) in a new, uniquely named
    schema, installed unless ``install`` is False and dropped afterwards."""
    schema = unique_schema_name()
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        TEST_DSN, min_size=1, max_size=max_size, kwargs={"autocommit": True}, open=False
    )
    await pool.open(wait=True)
    backend = PostgresBackend(pool, schema=schema)
    try:
        if install:
            await backend.install_schema()
        yield backend
    finally:
        await backend.close()
        await pool.close()
        await drop_schema(schema)


@asynccontextmanager
async def own_database() -> AsyncIterator[str]:
    """The DSN of a new database on the test server, dropped afterwards: for checks that
    other sessions' transactions in the shared database would hold back (pruning of old
    row versions, concurrent index builds)."""
    name = f"em_test_{secrets.token_hex(6)}"
    async with await connect() as connection:
        await connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlunsplit(urlsplit(TEST_DSN)._replace(path=f"/{name}"))
    finally:
        async with await connect() as connection:
            await connection.execute(
                sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name))
            )


@asynccontextmanager
async def open_publish(
    backend: PostgresBackend, application_name: str
) -> AsyncIterator[tuple[int, int]]:
    """A publish of one event to ``audit/a-1`` in a transaction left open (on its own
    connection, named ``application_name``) until the block ends, then rolled back:
    it holds every log and category reader of the schema back. Yields the session's
    pid and the transaction id's low 32 bits (as pg_locks shows it)."""
    async with await psycopg.AsyncConnection.connect(
        TEST_DSN, application_name=application_name
    ) as connection:
        await connection.execute(
            sql.SQL("SELECT {}.publish('audit', 'a-1', %s, NULL, %s::jsonb)").format(
                sql.Identifier(backend.schema)
            ),
            (stream_hash("a-1"), '[["noted", {}, {}, "2026-01-01T00:00:00+00:00"]]'),
        )
        cursor = await connection.execute(
            "SELECT pg_backend_pid(), pg_current_xact_id()::text::bigint & 4294967295"
        )
        row = await cursor.fetchone()
        assert row is not None
        yield row[0], row[1]
        await connection.rollback()

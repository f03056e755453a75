"""Migrations marked ``-- eventmill: no transaction`` (0004, the partition index) build
their indexes concurrently on an existing store: publishes go on while the build waits
for an open writer, and a build left invalid is dropped and built again. Each test has
a database of its own: a concurrent build waits for every older transaction of its
database (not of others: checked on PostgreSQL 15), and the shared one has other tests'
transactions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest

from eventmill import NewEvent
from eventmill.backends.postgres import PostgresBackend
from eventmill.store import EventStore
from tests.postgres_support import own_database, wait_for_lock_wait

pytestmark = pytest.mark.postgres

INDEX = "events_category_bucket_sequence_number_idx"


@asynccontextmanager
async def installed_backend() -> AsyncIterator[tuple[PostgresBackend, str]]:
    """A backend with the schema installed, in a database of its own, and its DSN."""
    async with own_database() as dsn:
        backend = await PostgresBackend.connect(dsn, schema="eventmill")
        try:
            await backend.install_schema()
            yield backend, dsn
        finally:
            await backend.close()


async def connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


async def forget_migration_4(backend: PostgresBackend, *, leave_invalid: bool) -> None:
    """Make the schema look as if 0004 never ran (or its build was interrupted)."""
    async with backend.connection() as connection:
        if leave_invalid:
            await connection.execute(
                "UPDATE pg_index SET indisvalid = false WHERE indexrelid = %s::regclass",
                (f"{backend.schema}.{INDEX}",),
            )
        else:
            await connection.execute(backend.sql(f"DROP INDEX {{schema}}.{INDEX}"))
        await connection.execute(
            backend.sql("DELETE FROM {schema}.schema_version WHERE version = 4")
        )


async def index_is_valid(backend: PostgresBackend) -> bool:
    async with backend.connection() as connection:
        cursor = await connection.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass",
            (f"{backend.schema}.{INDEX}",),
        )
        row = await cursor.fetchone()
    return row is not None and bool(row[0])


async def test_an_interrupted_build_is_built_again() -> None:
    async with installed_backend() as (backend, _):
        await forget_migration_4(backend, leave_invalid=True)
        assert not await index_is_valid(backend)
        assert await backend.install_schema() == [4]
        assert await index_is_valid(backend)
        assert await backend.install_schema() == []


async def test_publishes_go_on_while_the_build_waits_for_an_open_writer() -> None:
    async with installed_backend() as (backend, dsn):
        store = EventStore(backend)
        await store.stream(category="orders", stream="o-1").publish([NewEvent(name="a")])
        await forget_migration_4(backend, leave_invalid=False)
        async with await connect(dsn) as writer:
            await writer.execute("BEGIN")
            await writer.execute(backend.sql("UPDATE {schema}.events SET name = name WHERE false"))
            install = asyncio.create_task(backend.install_schema())
            # Until the build waits for the open writer (in this database, not another
            # test's build).
            await wait_for_lock_wait(dsn, f"CREATE INDEX CONCURRENTLY%{backend.schema}%")
            async with asyncio.timeout(10):  # a plain CREATE INDEX would block it
                await store.stream(category="orders", stream="o-2").publish([NewEvent(name="b")])
            assert not install.done()
            await writer.execute("COMMIT")
        assert await install == [4]
        assert await index_is_valid(backend)

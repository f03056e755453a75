"""PostgreSQL schema installation, backend settings and lifecycle."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from eventmill import (
    InvalidSettingsError,
    LifecycleError,
    NewEvent,
    SchemaError,
    StorageError,
)
from eventmill.backends.postgres import PostgresBackend
from eventmill.backends.postgres.schema import known_migrations
from eventmill.store import EventStore
from tests.postgres_support import (
    TEST_DSN,
    connect,
    drop_schema,
    fresh_postgres_backend,
    unique_schema_name,
)

pytestmark = pytest.mark.postgres


def unopened_pool() -> AsyncConnectionPool[Any]:
    return AsyncConnectionPool(TEST_DSN, min_size=1, max_size=2, open=False)


async def recorded_versions(schema: str) -> list[int]:
    async with await connect() as connection:
        cursor = await connection.execute(
            sql.SQL("SELECT version FROM {}.schema_version ORDER BY version").format(
                sql.Identifier(schema)
            )
        )
        return [row[0] for row in await cursor.fetchall()]


async def test_installing_twice_changes_nothing_the_second_time() -> None:
    known = [migration.version for migration in known_migrations()]
    assert known == list(range(1, len(known) + 1)), "migration numbers must be 1, 2, 3... once each"
    async with fresh_postgres_backend(install=False) as backend:
        assert await backend.install_schema() == known
        await EventStore(backend).stream(category="c", stream="s").publish([NewEvent(name="x")])
        assert await backend.install_schema() == []
        assert await recorded_versions(backend.schema) == known
        assert len(await EventStore(backend).log().read()) == 1


async def test_three_backends_installing_at_once_apply_each_migration_once() -> None:
    """Also with a snapshot held open in the database: an installer that saw the schema
    half created by another used to build 0004 concurrently, which waits for it."""
    known = [migration.version for migration in known_migrations()]
    async with await connect() as holder, holder.transaction():
        await holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        await holder.execute("SELECT txid_current()")  # an xid, and a snapshot held
        for _ in range(5):  # the race went wrong about one time in ten
            async with (
                fresh_postgres_backend(install=False) as first,
                fresh_postgres_backend(install=False) as second,
                fresh_postgres_backend(install=False) as third,
            ):
                schema = first.schema
                others = [PostgresBackend(b.pool, schema=schema) for b in (second, third)]
                async with asyncio.timeout(30):
                    applied = await asyncio.gather(
                        first.install_schema(), *(other.install_schema() for other in others)
                    )
                assert sorted(version for versions in applied for version in versions) == known
                assert await recorded_versions(schema) == known


async def test_a_schema_newer_than_the_code_is_refused() -> None:
    async with fresh_postgres_backend() as backend:
        async with await connect() as connection:
            await connection.execute(
                sql.SQL(
                    "INSERT INTO {}.schema_version (version, name) VALUES (9999, 'future')"
                ).format(sql.Identifier(backend.schema))
            )
        with pytest.raises(SchemaError, match="9999"):
            await backend.install_schema()


async def test_using_an_uninstalled_schema_says_how_to_install_it() -> None:
    async with fresh_postgres_backend(install=False) as backend:
        store = EventStore(backend)
        with pytest.raises(SchemaError, match="install_schema") as reading:
            await store.log().read()
        assert isinstance(reading.value.__cause__, psycopg.Error)
        with pytest.raises(SchemaError):
            await store.stream(category="c", stream="s").publish([NewEvent(name="x")])
        with pytest.raises(SchemaError):
            await store.category("c").latest()


@pytest.mark.parametrize(
    "schema", ["", "Upper", "1starts_with_digit", "has-dash", 'quo"te', "a b", "x" * 64, None, 3]
)
async def test_invalid_schema_names_are_refused_before_any_io(schema: object) -> None:
    with pytest.raises(InvalidSettingsError):
        PostgresBackend(unopened_pool(), schema=schema)  # type: ignore[arg-type]
    with pytest.raises(InvalidSettingsError):
        await PostgresBackend.connect("postgresql://nowhere.invalid/x", schema=schema)  # type: ignore[arg-type]


async def test_the_longest_valid_schema_name_works() -> None:
    schema = (unique_schema_name() + "_" + "z" * 63)[:63]
    assert len(schema) == 63
    pool = unopened_pool()
    await pool.open(wait=True)
    try:
        backend = PostgresBackend(pool, schema=schema)
        await backend.install_schema()
        assert await EventStore(backend).log().read() == []
    finally:
        await pool.close()
        await drop_schema(schema)


async def test_a_users_pool_stays_open_and_an_owned_pool_is_closed() -> None:
    async with fresh_postgres_backend() as users:
        await users.close()
        assert not users.pool.closed
        await users.close()
        with pytest.raises(LifecycleError):
            await EventStore(users).log().read()
        owned = await PostgresBackend.connect(TEST_DSN, schema=users.schema, max_size=2)
        assert await EventStore(owned).log().read() == []
        await owned.close()
        assert owned.pool.closed
        await owned.close()
        with pytest.raises(LifecycleError):
            await EventStore(owned).log().read()


async def test_an_unreachable_database_gives_storage_error() -> None:
    with pytest.raises(StorageError) as refused:
        await PostgresBackend.connect(
            "postgresql://postgres@127.0.0.1:1/test", connect_timeout=timedelta(seconds=2)
        )
    assert isinstance(refused.value.__cause__, psycopg.Error)


async def test_bad_pool_settings_are_refused() -> None:
    for settings in ({"min_size": 3, "max_size": 2}, {"max_size": 0}, {"min_size": -1}):
        with pytest.raises(InvalidSettingsError):
            await PostgresBackend.connect(TEST_DSN, **settings)  # type: ignore[arg-type]
    with pytest.raises(InvalidSettingsError):
        await PostgresBackend.connect(TEST_DSN, connect_timeout=timedelta(0))
    with pytest.raises(InvalidSettingsError):
        PostgresBackend("not a pool")  # type: ignore[arg-type]

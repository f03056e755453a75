"""PostgresBackend: every eventmill port over one psycopg 3 connection pool.

::

    backend = await PostgresBackend.connect(dsn)        # owns its pool
    backend = PostgresBackend(pool, schema="eventmill") # on your pool, which stays yours
    await backend.install_schema()

Stores borrow connections with ``backend.connection()``, which hands out a pool
connection in autocommit mode (each statement is its own transaction unless the caller
opens one with ``connection.transaction()``) and turns driver errors into eventmill
errors. SQL is written with a ``{schema}`` placeholder and composed by ``backend.sql``,
which inserts the validated, quoted schema name; user text never becomes SQL.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from eventmill.backends.base import Backend
from eventmill.backends.postgres import schema as schema_installer
from eventmill.backends.postgres.checkpoints import PostgresCheckpointStorage
from eventmill.backends.postgres.driver_errors import translate_driver_errors
from eventmill.backends.postgres.event_storage import PostgresEventStorage
from eventmill.backends.postgres.locks import PostgresLockManager
from eventmill.backends.postgres.notifications import PostgresEventNotifications
from eventmill.backends.postgres.projections import PostgresProjectionStorage
from eventmill.backends.postgres.subscribers import PostgresSubscriberStateStore
from eventmill.backends.postgres.subscriptions import PostgresSubscriptionStateStore
from eventmill.errors import InvalidSettingsError, LifecycleError, StorageError, describe

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def check_schema_name(value: object) -> str:
    """Return ``value`` if it is a usable schema name; raise InvalidSettingsError if not."""
    if isinstance(value, str) and _SCHEMA_NAME.match(value):
        return value
    raise InvalidSettingsError(
        f"schema must match {_SCHEMA_NAME.pattern} (lower-case letters, digits and _, "
        f"at most 63 characters), not {describe(value)}"
    )


class PostgresBackend(Backend):
    """The PostgreSQL backend. Constructing it does no I/O; a pool handed in is never
    closed by eventmill, a pool made by ``connect`` is closed by ``close()``."""

    def __init__(self, pool: AsyncConnectionPool[Any], *, schema: str = "eventmill") -> None:
        if not isinstance(pool, AsyncConnectionPool):
            raise InvalidSettingsError(f"pool must be an AsyncConnectionPool, not {pool!r:.80}")
        self.pool = pool
        self.schema = check_schema_name(schema)
        self._identifier = sql.Identifier(self.schema)
        self._owns_pool = False
        self._closed = False
        self._events = PostgresEventStorage(self)
        self._notifications = PostgresEventNotifications(self)
        self._checkpoints = PostgresCheckpointStorage(self)
        self._projections = PostgresProjectionStorage(self)
        self._locks = PostgresLockManager(self)
        self._subscribers = PostgresSubscriberStateStore(self)
        self._subscriptions = PostgresSubscriptionStateStore(self)

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        schema: str = "eventmill",
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: timedelta = timedelta(seconds=30),
    ) -> PostgresBackend:
        """A backend on a pool of its own, opened now.

        Blocks until ``min_size`` connections work (at most ``connect_timeout``). Raises
        InvalidSettingsError for bad arguments, StorageError when the database cannot be
        reached.
        """
        check_schema_name(schema)
        if type(min_size) is not int or type(max_size) is not int or not 0 <= min_size <= max_size:
            raise InvalidSettingsError(
                f"need ints with 0 <= min_size <= max_size,"
                f" not {describe(min_size)}, {describe(max_size)}"
            )
        if max_size < 1:
            raise InvalidSettingsError(f"max_size must be at least 1, not {describe(max_size)}")
        if not isinstance(connect_timeout, timedelta) or connect_timeout <= timedelta(0):
            raise InvalidSettingsError(
                f"connect_timeout must be a positive timedelta, not {describe(connect_timeout)}"
            )
        seconds = connect_timeout.total_seconds()
        try:
            # One direct connection first: a wrong DSN fails at once with the real reason.
            probe = await psycopg.AsyncConnection.connect(
                dsn, connect_timeout=max(1, round(seconds))
            )
            await probe.close()
        except psycopg.Error as error:
            raise StorageError(f"cannot connect to PostgreSQL: {error}") from error
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            kwargs={"autocommit": True},
            timeout=seconds,
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=seconds)
        except psycopg.Error as error:
            await pool.close()
            raise StorageError(f"cannot open a connection pool: {error}") from error
        backend = cls(pool, schema=schema)
        backend._owns_pool = True
        return backend

    @property
    def events(self) -> PostgresEventStorage:
        return self._events

    @property
    def notifications(self) -> PostgresEventNotifications:
        return self._notifications

    @property
    def checkpoints(self) -> PostgresCheckpointStorage:
        return self._checkpoints

    @property
    def projections(self) -> PostgresProjectionStorage:
        return self._projections

    @property
    def locks(self) -> PostgresLockManager:
        return self._locks

    @property
    def subscribers(self) -> PostgresSubscriberStateStore:
        return self._subscribers

    @property
    def subscriptions(self) -> PostgresSubscriptionStateStore:
        return self._subscriptions

    def sql(self, text: str) -> sql.Composed:
        """``text`` with ``{schema}`` replaced by the quoted schema name.

        Other braces must be doubled. Values go in as ``%s`` parameters, never here.
        """
        return sql.SQL(text).format(schema=self._identifier)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A pool connection in autocommit mode, given back afterwards.

        Blocks until the pool has one. psycopg errors raised inside become eventmill
        errors (StorageError, SchemaError); LifecycleError once the backend is closed.
        """
        if self._closed:
            raise LifecycleError("this PostgresBackend is closed")
        with translate_driver_errors(self.schema):
            async with self.pool.connection() as connection:
                if connection.autocommit:
                    yield connection
                    return
                await connection.set_autocommit(True)
                try:
                    yield connection
                finally:
                    if not connection.closed and not connection.broken:
                        await connection.set_autocommit(False)

    async def install_schema(self) -> list[int]:
        """Create or upgrade the schema; safe to call from many processes at once.

        Returns the migration versions applied now. Raises SchemaError when the
        database's schema is newer than this code, StorageError when the database fails.
        """
        async with self.connection() as connection:
            return await schema_installer.install(connection, self.schema)

    async def close(self) -> None:
        """Close the pool if this backend made it; a user's pool stays open. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._events.close()
        await self._notifications.close()
        if self._owns_pool:
            await self.pool.close()

    def __repr__(self) -> str:
        return f"<PostgresBackend schema={self.schema!r}>"

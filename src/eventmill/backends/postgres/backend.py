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

Transaction pooling: ``connect(dsn, direct_dsn=...)`` runs the pool over ``dsn`` (say
PgBouncer with ``pool_mode = transaction``) and every connection that needs a session
of its own over ``direct_dsn`` (PostgreSQL itself, or a pooler in session mode): the
locks, LISTEN, the heartbeats' connections and schema migrations. The pool then
prepares no statement, and reads take their watermark and read in one explicit READ
COMMITTED transaction (one round trip), so nothing depends on which server session a
transaction lands on.

Event loops: a psycopg pool serves only the loop it was opened on (the backend's home
loop: the one ``connect`` ran on, or for a user's pool the one the backend was made or
first used on). A backend made by ``connect`` also serves every other loop (services in
SHARED_THREAD or DEDICATED_THREAD isolation, other threads) from a small
``LoopConnectionPool`` per loop, opened on first use, closed when that loop shuts down
or by ``close()``. A backend on a user's pool refuses other loops with LifecycleError.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import threading
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
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
from eventmill.backends.postgres.groups import PostgresGroupStorage
from eventmill.backends.postgres.locks import PostgresLockManager
from eventmill.backends.postgres.loop_pools import LoopConnectionPool
from eventmill.backends.postgres.nodes import PostgresNodeStateStore
from eventmill.backends.postgres.notifications import PostgresEventNotifications
from eventmill.backends.postgres.parked import PostgresParkedStreamStorage
from eventmill.backends.postgres.projection_versions import PostgresProjectionVersionStorage
from eventmill.backends.postgres.projections import PostgresProjectionStorage
from eventmill.backends.postgres.server_checks import check_same_database, check_server
from eventmill.backends.postgres.subscribers import PostgresSubscriberStateStore
from eventmill.backends.postgres.subscriptions import PostgresSubscriptionStateStore
from eventmill.errors import (
    InvalidSettingsError,
    LifecycleError,
    SchemaError,
    StorageError,
    describe,
)

RECONNECT_WINDOW = timedelta(seconds=5)
"""How long the pool of ``connect`` retries a lost connection (after 1 and 2 s) before it
gives up until the next request for a connection starts over. psycopg_pool's default
(5 minutes of doubling delays) left a pool empty for about as long again as an outage
had lasted after the database came back."""

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
        self._closing = False
        self._closed = False
        self._home: asyncio.AbstractEventLoop | None = _running_loop()
        self._dsn: str | None = None
        self._direct_dsn: str | None = None
        self._per_loop_max_size = 0
        self._timeout = 0.0
        self._application_name = "eventmill"
        self._loop_pools_lock = threading.Lock()
        self._loop_pools: dict[asyncio.AbstractEventLoop, LoopConnectionPool] = {}
        self._events = PostgresEventStorage(self)
        self._notifications = PostgresEventNotifications(self)
        self._checkpoints = PostgresCheckpointStorage(self)
        self._projections = PostgresProjectionStorage(self)
        self._locks = PostgresLockManager(self)
        self._subscribers = PostgresSubscriberStateStore(self)
        self._subscriptions = PostgresSubscriptionStateStore(self)
        self._nodes = PostgresNodeStateStore(self)
        self._parked = PostgresParkedStreamStorage(self)
        self._groups = PostgresGroupStorage(self)
        self._projection_versions = PostgresProjectionVersionStorage(self)

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        schema: str = "eventmill",
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: timedelta = timedelta(seconds=30),
        per_loop_max_size: int = 4,
        application_name: str | None = None,
        direct_dsn: str | None = None,
    ) -> PostgresBackend:
        """A backend on a pool of its own, opened now on the running loop; on any other
        loop it uses a pool of at most ``per_loop_max_size`` connections of that loop.
        Every connection it opens carries ``application_name`` (``pg_stat_activity``
        shows it; ``eventmill run`` sets ``eventmill:<node id>``); when it is None, the
        DSN's own ``application_name`` if it names one, else ``eventmill``.

        With ``direct_dsn``, the pool may sit behind a pooler that does not keep sessions
        (PgBouncer in transaction mode), and the locks, LISTEN, heartbeats and
        migrations connect to ``direct_dsn``, which must keep them and lead to the same
        database (see the module docstring).

        Blocks until ``min_size`` connections work (at most ``connect_timeout``). Raises
        InvalidSettingsError for bad arguments, StorageError when the database cannot be
        reached, is older than PostgreSQL 14, sits behind a pooler that does not keep
        sessions (PgBouncer in transaction mode) without a ``direct_dsn`` that does, or
        when ``direct_dsn`` leads elsewhere than ``dsn`` (see ``server_checks``).
        """
        if not isinstance(dsn, str):
            raise InvalidSettingsError(f"dsn must be a connection string, not {describe(dsn)}")
        if direct_dsn is not None and not isinstance(direct_dsn, str):
            raise InvalidSettingsError(
                f"direct_dsn must be a connection string or None, not {describe(direct_dsn)}"
            )
        check_schema_name(schema)
        if type(min_size) is not int or type(max_size) is not int or not 0 <= min_size <= max_size:
            raise InvalidSettingsError(
                f"need ints with 0 <= min_size <= max_size,"
                f" not {describe(min_size)}, {describe(max_size)}"
            )
        if max_size < 1:
            raise InvalidSettingsError(f"max_size must be at least 1, not {describe(max_size)}")
        if type(per_loop_max_size) is not int or per_loop_max_size < 1:
            raise InvalidSettingsError(
                f"per_loop_max_size must be an int of at least 1, not {describe(per_loop_max_size)}"
            )
        if not isinstance(connect_timeout, timedelta) or connect_timeout <= timedelta(0):
            raise InvalidSettingsError(
                f"connect_timeout must be a positive timedelta, not {describe(connect_timeout)}"
            )
        if application_name is None:
            application_name = _dsn_application_name(dsn)
        if not isinstance(application_name, str) or not application_name.isprintable():
            raise InvalidSettingsError(
                f"application_name must be printable text, not {describe(application_name)}"
            )
        seconds = connect_timeout.total_seconds()
        settings: dict[str, Any] = {"autocommit": True, "application_name": application_name}
        # Direct connections first: a wrong DSN fails at once with the real reason, and
        # an unsupported server or a pooler that does not keep sessions is refused.
        await check_server(
            dsn if direct_dsn is None else direct_dsn, settings, max(1, round(seconds))
        )
        pool_settings = settings
        if direct_dsn is not None:
            pool_settings = {**settings, "prepare_threshold": None}
            await check_same_database(direct_dsn, dsn, pool_settings, max(1, round(seconds)))
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            kwargs=pool_settings,
            timeout=seconds,
            reconnect_timeout=RECONNECT_WINDOW.total_seconds(),
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=seconds)
        except psycopg.Error as error:
            await pool.close()
            raise StorageError(f"cannot open a connection pool: {error}") from error
        backend = cls(pool, schema=schema)
        backend._owns_pool = True
        backend._dsn = dsn
        backend._direct_dsn = direct_dsn
        backend._per_loop_max_size = per_loop_max_size
        backend._timeout = seconds
        backend._application_name = application_name
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

    @property
    def parked(self) -> PostgresParkedStreamStorage:
        return self._parked

    @property
    def groups(self) -> PostgresGroupStorage:
        return self._groups

    @property
    def nodes(self) -> PostgresNodeStateStore:
        return self._nodes

    @property
    def projection_versions(self) -> PostgresProjectionVersionStorage:
        return self._projection_versions

    def sql(self, text: str) -> sql.Composed:
        """``text`` with ``{schema}`` replaced by the quoted schema name.

        Other braces must be doubled. Values go in as ``%s`` parameters, never here.
        """
        return sql.SQL(text).format(schema=self._identifier)

    @property
    def transaction_pooled(self) -> bool:
        """Whether the pool may run each transaction in another server session (made by
        ``connect`` with a ``direct_dsn``): then its connections prepare no statement
        (``prepare_threshold=None``, which overrides ``prepare=True``)."""
        return self._direct_dsn is not None

    @property
    def home_loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the backend's own pool serves (None until known)."""
        return self._home

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A connection in autocommit mode, given back afterwards, from the pool of the
        running event loop (see the module docstring).

        Blocks until the pool has one. psycopg errors raised inside become eventmill
        errors (StorageError, SchemaError); LifecycleError once the backend is closed,
        or on a loop other than the home loop of a backend on a user's pool.
        """
        if self._closed:
            raise LifecycleError("this PostgresBackend is closed")
        loop = asyncio.get_running_loop()
        if self._home is None:
            self._home = loop
        with translate_driver_errors(self.schema):
            borrowed: AbstractAsyncContextManager[AsyncConnection[Any]] = (
                self.pool.connection() if loop is self._home else self._loop_pool(loop)
            )
            async with borrowed as connection:
                if connection.autocommit:
                    yield connection
                    return
                await connection.set_autocommit(True)
                try:
                    yield connection
                finally:
                    if not connection.closed and not connection.broken:
                        await connection.set_autocommit(False)

    def _loop_pool(
        self, loop: asyncio.AbstractEventLoop
    ) -> AbstractAsyncContextManager[AsyncConnection[Any]]:
        """The connection context of ``loop``'s own pool, opened now if need be."""
        if self._dsn is None:
            raise LifecycleError(
                "this PostgresBackend was made on your connection pool, which serves only "
                "the event loop it was opened on; to use the backend from other threads' "
                "loops (SHARED_THREAD or DEDICATED_THREAD isolation) make it with "
                "PostgresBackend.connect(dsn), or run its users in MAIN_THREAD isolation"
            )
        with self._loop_pools_lock:
            if self._closed:
                raise LifecycleError("this PostgresBackend is closed")
            pool = self._loop_pools.get(loop)
            if pool is None:
                pool = self._loop_pools[loop] = LoopConnectionPool(
                    self._connect_for_loop,
                    max_size=self._per_loop_max_size,
                    timeout=self._timeout,
                    on_closed=self._forget_loop_pool,
                )
        return pool.connection()

    async def dedicated_connection(self) -> AsyncConnection[Any]:
        """A new autocommit connection outside the pool, for locks, LISTEN, heartbeats
        and migrations: to the ``direct_dsn`` if ``connect`` was given one, else made the
        way the pool makes its own (its conninfo and kwargs). The caller closes it.
        Raises psycopg.Error when it cannot connect."""
        if self._direct_dsn is not None:
            return await AsyncConnection.connect(
                self._direct_dsn,
                autocommit=True,
                connect_timeout=max(1, round(self._timeout)),
                application_name=self._application_name,
            )
        conninfo: str = await _pool_setting(self.pool.conninfo)
        kwargs: dict[str, Any] = dict(await _pool_setting(self.pool.kwargs) or {})
        return await AsyncConnection.connect(conninfo, **{**kwargs, "autocommit": True})

    async def _connect_for_loop(self) -> AsyncConnection[Any]:
        assert self._dsn is not None
        return await AsyncConnection.connect(
            self._dsn,
            autocommit=True,
            connect_timeout=max(1, round(self._timeout)),
            application_name=self._application_name,
            **({"prepare_threshold": None} if self._direct_dsn is not None else {}),
        )

    def _forget_loop_pool(self, pool: LoopConnectionPool) -> None:
        with self._loop_pools_lock:
            if self._loop_pools.get(pool.loop) is pool:
                del self._loop_pools[pool.loop]

    @property
    def loop_pool_count(self) -> int:
        """How many event loops other than the home loop have a pool open now."""
        with self._loop_pools_lock:
            return len(self._loop_pools)

    async def install_schema(self) -> list[int]:
        """Create or upgrade the schema; safe to call from many processes at once.

        Returns the migration versions applied now. Runs on a dedicated connection when
        the pool is transaction-pooled (its migration lock is a session lock). Raises
        SchemaError when the database's schema is newer than this code, StorageError
        when the database fails.
        """
        if self._direct_dsn is None:
            async with self.connection() as connection:
                return await schema_installer.install(connection, self.schema)
        with translate_driver_errors(self.schema):
            direct = await self.dedicated_connection()
            try:
                return await schema_installer.install(direct, self.schema)
            finally:
                await direct.close()

    async def repair_copied_events(self) -> int:
        """Restamp events copied from another cluster; return how many were restamped.

        Events keep the transaction id (xid) of the cluster that wrote them. After a
        pg_dump/pg_restore or a logical-replication copy into another cluster, xids at
        or above this cluster's own counter make log and category reads stop there
        (they never skip them: they wait, and new events behind them wait too). This
        finds such rows with one read of the table (no lock); only when there are some,
        it locks the table against writers (SHARE ROW EXCLUSIVE, readers go on), sets
        their xid to 0 (committed long ago), and moves the sequence past the highest
        sequence number if it is behind (logical replication does not copy sequences).
        ``eventmill migrate`` runs it. Blocks for a scan of the events table. Raises
        StorageError, SchemaError.
        """
        async with self.connection() as connection:
            cursor = await connection.execute(self.sql(_FOREIGN_EVENTS))
            row = await cursor.fetchone()
            if row is None or not row[0]:
                return 0
            async with connection.transaction():
                await connection.execute("SET LOCAL lock_timeout = '60s'")
                await connection.execute(
                    self.sql("LOCK TABLE {schema}.events IN SHARE ROW EXCLUSIVE MODE")
                )
                # Every writer that inserted has ended (the lock waited for it), so
                # every row at or above this transaction's own xid is foreign.
                cursor = await connection.execute(
                    self.sql(
                        "UPDATE {schema}.events SET transaction_id = '0'"
                        " WHERE transaction_id >= pg_current_xact_id()"
                    )
                )
                restamped = cursor.rowcount
                await connection.execute(self.sql(_SEQUENCE_PAST_EVENTS))
        return restamped

    async def schema_version(self) -> int | None:
        """The newest migration applied. Raises SchemaError when not installed."""
        async with self.connection() as connection:
            cursor = await connection.execute(
                self.sql("SELECT max(version) FROM {schema}.schema_version")
            )
            row = await cursor.fetchone()
        return None if row is None else row[0]

    async def check_schema(self) -> None:
        """Raise SchemaError, naming ``eventmill migrate``, when the schema is missing,
        lacks a migration of this code, or is newer than it; StorageError when the
        database fails."""
        async with self.connection() as connection:
            missing = await schema_installer.check(connection, self.schema)
        if missing:
            raise SchemaError(
                f"the eventmill schema {self.schema!r} lacks migration"
                f"{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}: "
                "run `eventmill migrate`"
            )

    async def close(self) -> None:
        """Close the LISTEN connection, the lock manager's standby connections and the
        heartbeat connections, then close the pools this backend made (the other
        loops' idle connections at once, those in use when given back); a user's pool
        stays open. Idempotent."""
        if self._closing:
            return
        self._closing = True
        await self._notifications.close()
        await self._locks.close()
        await self._subscribers.close()
        with self._loop_pools_lock:
            self._closed = True
            loop_pools = list(self._loop_pools.values())
            self._loop_pools.clear()
        for loop_pool in loop_pools:
            await loop_pool.close()
        if self._owns_pool:
            await self.pool.close()

    def __repr__(self) -> str:
        return f"<PostgresBackend schema={self.schema!r}>"


_FOREIGN_EVENTS = (
    "SELECT EXISTS (SELECT FROM {schema}.events"
    " WHERE transaction_id >= pg_snapshot_xmax(pg_current_snapshot()))"
)
_SEQUENCE_PAST_EVENTS = (
    "SELECT setval('{schema}.event_sequence_numbers', max(sequence_number))"
    " FROM {schema}.events HAVING max(sequence_number) >"
    " (SELECT last_value FROM {schema}.event_sequence_numbers)"
)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _pool_setting(setting: Any) -> Any:
    """A pool setting's value: psycopg_pool accepts values, functions and coroutines."""
    if callable(setting):
        setting = setting()
    if inspect.isawaitable(setting):
        setting = await setting
    return setting


def _dsn_application_name(dsn: str) -> str:
    """The ``application_name`` a DSN names, or ``eventmill``; raises
    InvalidSettingsError when the DSN cannot be parsed."""
    try:
        named = psycopg.conninfo.conninfo_to_dict(dsn).get("application_name")
    except psycopg.ProgrammingError as error:
        raise InvalidSettingsError(f"cannot parse the dsn: {error}") from error
    return str(named) if named else "eventmill"

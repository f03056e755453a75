"""PostgresLockManager: named locks as PostgreSQL session-level advisory locks.

Each held lock lives on a dedicated connection of its own (not from the pool), in
autocommit mode so it never sits idle in a transaction; the lock lasts as long as that
session. Closing the connection releases it; if the connection dies (server restart,
``pg_terminate_backend``, network loss), the server drops the lock and another process
may take it. The holder finds out through ``wait_lost()``, which runs ``SELECT 1`` on
the lock's connection every ``check_interval`` and treats a failed or slow check (over
``check_timeout``) as a loss; ``confirm()`` runs one such check at once.

A lock taken with a ``lease`` sets ``idle_session_timeout`` to it on its connection
and is checked at least three times per lease, so a live holder's session is never
idle that long; a frozen holder's is, and the server ends it, dropping the lock. When
the holder wakes, its next check (or ``confirm()``) fails and it learns the lock is
gone.

A name maps to a bigint key: the first 8 bytes of SHA-256 of the schema name and the
lock name, so backends in different schemas never share a lock, in any process or
Python version. ``wait_for_lock`` polls ``pg_try_advisory_lock`` on one connection,
backing off from 10 ms to ``max_poll_interval``, so timeouts of any length work and
nothing holds a server-side wait.

Attempts do not open a connection each: every event loop keeps one idle standby
connection (holding no lock) for its next attempt. The connection that wins becomes the
lock's own and a new standby is opened by the attempt after it; a standby found dead
(server restart, terminated session) is replaced once within the attempt. ``close()``
closes the standby connections; those of a manager dropped unclosed are closed when it
is garbage-collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
import weakref
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import AsyncConnection

from eventmill.backends.base import Lock, LockHolder, LockManager, check_age
from eventmill.backends.postgres.driver_errors import translate_driver_errors
from eventmill.errors import InvalidSettingsError
from eventmill.events import check_name

if TYPE_CHECKING:
    from eventmill.backends.postgres.backend import PostgresBackend

_HOLDER = (
    "SELECT l.pid, a.application_name FROM pg_locks AS l"
    " LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid"
)
"""The session holding a bigint advisory lock (its high and low 32 bits)."""

_FIRST_POLL = 0.01
_CHECKS_PER_LEASE = 3


def lock_key(schema: str, name: str) -> int:
    """The advisory lock key (a signed 64-bit int) of lock ``name`` in ``schema``."""
    digest = hashlib.sha256(f"{schema}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PostgresLock(Lock):
    """A held advisory lock and the connection it lives on."""

    def __init__(
        self,
        name: str,
        connection: AsyncConnection[Any],
        *,
        backend_pid: int,
        check_interval: float,
        check_timeout: float,
    ) -> None:
        self._name = name
        self._connection = connection
        self._check_interval = check_interval
        self._check_timeout = check_timeout
        self._held = True
        self._gone = asyncio.Event()
        self.backend_pid = backend_pid
        """The PostgreSQL process id of the lock's session (for diagnostics)."""

    @property
    def name(self) -> str:
        return self._name

    @property
    def is_held(self) -> bool:
        return self._held

    async def release(self) -> None:
        """Unlock (so the lock is free when this returns, if the session still answers
        within a second), then close the lock's connection, which frees it in any case."""
        was_held = self._held
        self._held = False
        self._gone.set()
        if was_held:
            with contextlib.suppress(psycopg.Error, TimeoutError):
                async with asyncio.timeout(1):
                    await self._connection.execute("SELECT pg_advisory_unlock_all()")
        with contextlib.suppress(psycopg.Error):
            await self._connection.close()

    async def wait_lost(self) -> None:
        while await self.confirm():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._check_interval):
                    await self._gone.wait()

    async def confirm(self) -> bool:
        """``SELECT 1`` on the lock's session (which holds the lock while it lives);
        a failed or slow check releases the lock and returns False."""
        if not self._held:
            return False
        try:
            async with asyncio.timeout(self._check_timeout):
                await self._connection.execute("SELECT 1")
        except (psycopg.Error, TimeoutError):
            await self.release()
            return False
        return self._held


class PostgresLockManager(LockManager):
    """Advisory locks of one PostgresBackend, each on a connection of its own opened
    with the pool's connection settings."""

    def __init__(
        self,
        backend: PostgresBackend,
        *,
        check_interval: timedelta = timedelta(seconds=1),
        check_timeout: timedelta = timedelta(seconds=5),
        max_poll_interval: timedelta = timedelta(milliseconds=250),
    ) -> None:
        for what, value in (
            ("check_interval", check_interval),
            ("check_timeout", check_timeout),
            ("max_poll_interval", max_poll_interval),
        ):
            if check_age(value, what) <= timedelta(0):
                raise InvalidSettingsError(f"{what} must be positive, not {value}")
        self._backend = backend
        self._check_interval = check_interval.total_seconds()
        self._check_timeout = check_timeout.total_seconds()
        self._max_poll = max_poll_interval.total_seconds()
        self._closed = False
        self._standby_lock = threading.Lock()
        self._standby: dict[asyncio.AbstractEventLoop, AsyncConnection[Any]] = {}
        weakref.finalize(self, _finish, self._standby)

    async def try_lock(self, name: str, *, lease: timedelta | None = None) -> PostgresLock | None:
        return await self._take(name, 0.0, lease)

    async def wait_for_lock(
        self,
        name: str,
        timeout: timedelta,  # noqa: ASYNC109
        *,
        lease: timedelta | None = None,
    ) -> PostgresLock | None:
        return await self._take(name, check_age(timeout, "timeout").total_seconds(), lease)

    async def holder(self, name: str) -> LockHolder | None:
        """The session holding the advisory lock of ``name`` in this database, from
        ``pg_locks`` and ``pg_stat_activity``."""
        check_name(name, "lock name")
        key = lock_key(self._backend.schema, name) & 0xFFFF_FFFF_FFFF_FFFF
        async with self._backend.connection() as connection:
            cursor = await connection.execute(_HOLDER, (key >> 32, key & 0xFFFF_FFFF))
            row = await cursor.fetchone()
        return None if row is None else LockHolder(session=row[0], application_name=row[1])

    async def close(self) -> None:
        """Close the standby connections (held locks stay held); later attempts close
        their connection afterwards. Idempotent; never blocks on the server."""
        with self._standby_lock:
            self._closed = True
            connections = list(self._standby.values())
            self._standby.clear()
        for connection in connections:
            await connection.close()

    async def _connect(self) -> AsyncConnection[Any]:
        return await self._backend.dedicated_connection()

    async def _checkout(self) -> AsyncConnection[Any] | None:
        """Take the running loop's standby connection, if any; close those of closed
        loops."""
        loop = asyncio.get_running_loop()
        with self._standby_lock:
            dead = [other for other in self._standby if other.is_closed()]
            orphans = [self._standby.pop(other) for other in dead]
            connection = self._standby.pop(loop, None)
        for orphan in orphans:
            await orphan.close()
        return connection

    async def _checkin(self, connection: AsyncConnection[Any]) -> None:
        """Keep ``connection`` (holding no lock) as the running loop's standby, or close
        it if the manager is closed or the loop has one already."""
        loop = asyncio.get_running_loop()
        with self._standby_lock:
            if not self._closed and not connection.closed and loop not in self._standby:
                self._standby[loop] = connection
                return
        await connection.close()

    async def _take(
        self, name: str, seconds: float, lease: timedelta | None
    ) -> PostgresLock | None:
        """Try on the standby connection until taken or ``seconds`` passed; a lock
        taken lives on that connection, with ``lease`` as its idle_session_timeout."""
        check_name(name, "lock name")
        if lease is not None and check_age(lease, "lease") <= timedelta(0):
            raise InvalidSettingsError(f"lease must be positive, not {lease}")
        key = lock_key(self._backend.schema, name)
        deadline = time.monotonic() + seconds
        # a held lock's session is checked (so not idle) several times per lease
        interval = self._check_interval
        if lease is not None:
            interval = min(interval, lease.total_seconds() / _CHECKS_PER_LEASE)
        with translate_driver_errors(self._backend.schema):
            connection = await self._attempt(key, deadline)
            if connection is None:
                return None
            try:
                # The server's own process id: behind PgBouncer (session mode) the one
                # the client was told at connect is PgBouncer's, not the server's.
                cursor = await connection.execute("SELECT pg_backend_pid()")
                row = await cursor.fetchone()
            except BaseException:
                await connection.close()  # frees the lock
                raise
            backend_pid: int = row[0] if row is not None else connection.info.backend_pid
            if lease is not None:
                milliseconds = max(1, round(lease.total_seconds() * 1000))
                try:
                    await connection.execute(f"SET idle_session_timeout = {milliseconds:d}")
                except BaseException:
                    await connection.close()  # frees the lock
                    raise
            return PostgresLock(
                name,
                connection,
                backend_pid=backend_pid,
                check_interval=interval,
                check_timeout=self._check_timeout,
            )

    async def _attempt(self, key: int, deadline: float) -> AsyncConnection[Any] | None:
        """Poll for ``key`` on the standby connection (opened if none; a kept one found
        dead is replaced once). Returns the connection if it now holds the lock, else
        None with the connection kept as the standby."""
        connection = await self._checkout()
        replaceable = connection is not None
        while True:
            if connection is None:
                connection = await self._connect()
            try:
                taken = await self._poll(connection, key, deadline)
            except psycopg.OperationalError:
                await connection.close()
                if not replaceable:
                    raise
                replaceable, connection = False, None
                continue
            except BaseException:
                await connection.close()  # frees the lock if taken as this was cancelled
                raise
            if taken:
                return connection
            await self._checkin(connection)
            return None

    async def _poll(self, connection: AsyncConnection[Any], key: int, deadline: float) -> bool:
        """``pg_try_advisory_lock`` on ``connection`` until it succeeds (True) or the
        deadline passed (False), backing off between tries."""
        delay = _FIRST_POLL
        while True:
            cursor = await connection.execute("SELECT pg_try_advisory_lock(%s)", (key,))
            row = await cursor.fetchone()
            if row is not None and row[0] is True:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, self._max_poll)


def _finish(standby: dict[asyncio.AbstractEventLoop, AsyncConnection[Any]]) -> None:
    """Close a dropped manager's standby connections from whatever thread collects
    it, without awaiting (``AsyncConnection.close`` awaits nothing either)."""
    for connection in list(standby.values()):
        connection.pgconn.finish()
    standby.clear()

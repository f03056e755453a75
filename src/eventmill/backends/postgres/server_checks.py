"""Checks of the PostgreSQL server a backend is given, made once when it connects.

eventmill needs PostgreSQL 14 or newer (``pg_current_xact_id`` and friends since 13,
``idle_session_timeout`` for the coordinator's lease since 14) and connections that
keep their session between transactions: session-level advisory locks, LISTEN,
prepared statements and session settings all break when a pooler such as PgBouncer in
``pool_mode = transaction`` hands each transaction to whichever server connection is
free. Both are refused with one clear StorageError instead of failing later in
confusing ways. With a direct DSN beside a transaction-pooled one (see
``PostgresBackend.connect``), the direct one must keep sessions and lead to the same
database (``check_same_database``).
"""

from __future__ import annotations

import secrets
from typing import Any

import psycopg

from eventmill.errors import StorageError

MINIMUM_SERVER_VERSION = 140000  # as in server_version_num


def check_server_version(server_version: int) -> None:
    """Raise StorageError when ``server_version`` (as ``server_version_num``) is too old."""
    if server_version < MINIMUM_SERVER_VERSION:
        raise StorageError(
            f"PostgreSQL {server_version // 10000}.{server_version % 10000} is not supported: "
            f"eventmill needs PostgreSQL {MINIMUM_SERVER_VERSION // 10000} or newer"
        )


_MARK = "SELECT pg_backend_pid(), set_config('eventmill.session_probe', %s, false)"
_LOOK = "SELECT pg_backend_pid(), current_setting('eventmill.session_probe', true)"


_OWN_LOOKS = 4
"""How often the marking connection looks for its own mark (in as many transactions)."""


async def check_server(dsn: str, settings: dict[str, Any], connect_timeout: int) -> None:
    """Connect twice to ``dsn`` and check the version and that sessions are kept.

    One connection marks its session; the other, inside a transaction, looks for the
    mark; then the first looks for its own mark, ``_OWN_LOOKS`` times. On a direct
    connection (or PgBouncer in session mode) each connection keeps one server session
    of its own: the second never sees the mark, the first always does, and the two
    server processes differ. A pooler that hands out server connections per
    transaction breaks one of these whichever server connection it picks: the last
    used (PgBouncer's default) gives the second the marked session; in turn
    (``server_round_robin``) gives the first other sessions; a single one does both.
    Blocks for seven round trips. Raises StorageError when the server cannot be
    reached, is too old, or pools per transaction or statement.
    """
    try:
        async with (
            await psycopg.AsyncConnection.connect(
                dsn, connect_timeout=connect_timeout, **settings
            ) as first,
            await psycopg.AsyncConnection.connect(
                dsn, connect_timeout=connect_timeout, **settings
            ) as second,
        ):
            check_server_version(first.info.server_version)
            token = secrets.token_hex(8)
            pid, _ = await _row(first, _MARK, (token,))
            try:
                async with second.transaction():
                    other_pid, seen = await _row(second, _LOOK)
            except psycopg.errors.FeatureNotSupported as error:  # statement pooling
                raise _pooled() from error
            own = [await _row(first, _LOOK) for _ in range(_OWN_LOOKS)]
    except psycopg.Error as error:
        raise StorageError(f"cannot connect to PostgreSQL: {error}") from error
    if seen == token or other_pid == pid or any(row != (pid, token) for row in own):
        raise _pooled()


_HELD_HERE = (
    "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND objsubid = 1 AND classid = %s::bigint::oid AND objid = %s::bigint::oid"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
)


async def check_same_database(
    direct_dsn: str, dsn: str, settings: dict[str, Any], connect_timeout: int
) -> None:
    """Check that ``direct_dsn`` and ``dsn`` lead to one database of one server, and
    that ``dsn`` runs transactions (a pooler in transaction mode does; statement
    pooling does not).

    A connection to ``direct_dsn`` takes an advisory lock on a random key; a
    connection to ``dsn``, inside a transaction, must see it held in its own database.
    Blocks for a few round trips. Raises StorageError when either cannot be reached,
    when they lead to different databases, or when ``dsn`` refuses transactions.
    """
    key = secrets.randbits(63)
    try:
        async with (
            await psycopg.AsyncConnection.connect(
                direct_dsn, connect_timeout=connect_timeout, **settings
            ) as direct,
            await psycopg.AsyncConnection.connect(
                dsn, connect_timeout=connect_timeout, **settings
            ) as pooled,
        ):
            await direct.execute("SELECT pg_advisory_lock(%s)", (key,))
            try:
                async with pooled.transaction():
                    (same,) = await _row(pooled, _HELD_HERE, (key >> 32, key & 0xFFFF_FFFF))
            except psycopg.errors.FeatureNotSupported as error:  # statement pooling
                raise _pooled() from error
    except psycopg.Error as error:
        raise StorageError(f"cannot connect to PostgreSQL: {error}") from error
    if not same:
        raise StorageError(
            "the dsn and the direct_dsn lead to different databases: the direct_dsn must "
            "name the same database on the same PostgreSQL server as the dsn, without a "
            "pooler in transaction mode"
        )


def _pooled() -> StorageError:
    return StorageError(
        "this PostgreSQL connection does not keep its session between transactions "
        "(PgBouncer with pool_mode = transaction or statement?): eventmill needs "
        "session-level locks, LISTEN and prepared statements; set pool_mode = session "
        "for this database in pgbouncer.ini, connect to PostgreSQL directly, or keep "
        "this DSN for the pool and give a direct one for the rest (--direct-dsn, "
        "EVENTMILL_DIRECT_DSN, PostgresBackend.connect(direct_dsn=...))"
    )


async def _row(
    connection: psycopg.AsyncConnection[Any], query: str, parameters: tuple[object, ...] = ()
) -> tuple[Any, ...]:
    cursor = await connection.execute(query, parameters)
    row = await cursor.fetchone()
    assert row is not None
    return tuple(row)

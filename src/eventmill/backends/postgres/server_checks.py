"""Checks of the PostgreSQL server a backend is given, made once when it connects.

eventmill needs PostgreSQL 14 or newer (``pg_current_xact_id`` and friends since 13,
``idle_session_timeout`` for the coordinator's lease since 14) and connections that
keep their session between transactions: session-level advisory locks, LISTEN,
prepared statements and session settings all break when a pooler such as PgBouncer in
``pool_mode = transaction`` hands each transaction to whichever server connection is
free. Both are refused with one clear StorageError instead of failing later in
confusing ways.
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


async def check_server(dsn: str, settings: dict[str, Any], connect_timeout: int) -> None:
    """Connect twice to ``dsn`` and check the version and that sessions are kept.

    One connection marks its session; the other, inside a transaction, looks for the
    mark; then the first looks for its own mark. On a direct connection (or PgBouncer
    in session mode) each connection keeps one server session of its own: the second
    never sees the mark, the first always does, and the two server processes differ.
    A pooler that hands out server connections per transaction breaks one of these.
    Blocks for four round trips. Raises StorageError when the server cannot be
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
                    own_pid, own = await _row(first, _LOOK)
            except psycopg.errors.FeatureNotSupported as error:  # statement pooling
                raise _pooled() from error
    except psycopg.Error as error:
        raise StorageError(f"cannot connect to PostgreSQL: {error}") from error
    if seen == token or own != token or other_pid == pid or own_pid != pid:
        raise _pooled()


def _pooled() -> StorageError:
    return StorageError(
        "this PostgreSQL connection does not keep its session between transactions "
        "(PgBouncer with pool_mode = transaction or statement?): eventmill needs "
        "session-level locks, LISTEN and prepared statements on every connection; "
        "set pool_mode = session for this database in pgbouncer.ini, or connect to "
        "PostgreSQL directly"
    )


async def _row(
    connection: psycopg.AsyncConnection[Any], query: str, parameters: tuple[object, ...] = ()
) -> tuple[Any, ...]:
    cursor = await connection.execute(query, parameters)
    row = await cursor.fetchone()
    assert row is not None
    return tuple(row)

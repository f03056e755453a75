"""Installing and upgrading the eventmill schema in PostgreSQL.

The schema ships as ordered migration files, ``migrations/NNNN_<what>.sql``, each a
template in which ``{schema}`` stands for the quoted schema name. ``install`` creates the
schema and its ``schema_version`` table when missing and applies, in order, every file
whose number is not recorded there yet, each in a transaction of its own. Every step
first takes a transaction-level advisory lock on the schema name, so processes
installing at the same time queue instead of colliding; installing twice changes
nothing. A database recording a version newer than this code's files is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from psycopg import AsyncConnection, sql

from eventmill.backends.postgres.server_checks import check_server_version
from eventmill.errors import SchemaError

# Advisory lock class ids used by eventmill (first key of the two-integer form), one
# per purpose; docs/advisory-locks.md lists every advisory key eventmill takes.
PUBLISH_LOCK_CLASS = 1162690868  # publish's critical section, keyed by sequence oid
PUBLISHER_MARKER_CLASS = 1162690869  # publish's marker of version 0001, by sequence oid
MIGRATION_LOCK_CLASS = 1162690870  # schema installs, keyed by hashtext(schema name)
VERSION_LOCK_CLASS = 1162690870  # projection version upkeep, keyed by hashtext(name)

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Migration:
    """One migration file: its number, name and SQL template."""

    version: int
    name: str
    template: str


def known_migrations() -> list[Migration]:
    """The migration files shipped with this package, in version order."""
    folder = resources.files("eventmill.backends.postgres").joinpath("migrations")
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(
                Migration(
                    version=int(match.group(1)),
                    name=match.group(2),
                    template=entry.read_text(encoding="utf-8"),
                )
            )
    return sorted(found, key=lambda migration: migration.version)


async def install(connection: AsyncConnection[Any], schema: str) -> list[int]:
    """Create or upgrade ``schema`` over an autocommit ``connection``.

    Returns the versions applied now (empty when already up to date). Raises
    SchemaError when the database records a version this code does not know,
    StorageError when the server is older than eventmill supports; driver errors
    propagate (the caller translates them).
    """
    check_server_version(connection.info.server_version)
    identifier = sql.Identifier(schema)
    lock = sql.SQL("SELECT pg_advisory_xact_lock({}, hashtext({}))").format(
        sql.Literal(MIGRATION_LOCK_CLASS), sql.Literal(schema)
    )
    async with connection.transaction():
        await connection.execute(lock)
        await connection.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(identifier))
        await connection.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.schema_version ("
                " version integer PRIMARY KEY,"
                " name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(identifier)
        )
    migrations = known_migrations()
    newest_known = max((migration.version for migration in migrations), default=0)
    applied_now: list[int] = []
    for migration in migrations:
        async with connection.transaction():
            await connection.execute(lock)
            cursor = await connection.execute(
                sql.SQL("SELECT version FROM {}.schema_version").format(identifier)
            )
            applied = {row[0] for row in await cursor.fetchall()}
            newer = sorted(version for version in applied if version > newest_known)
            if newer:
                raise SchemaError(
                    f"schema {schema!r} has version {newer[-1]}, newer than this eventmill "
                    f"knows ({newest_known}); upgrade eventmill"
                )
            if migration.version in applied:
                continue
            await connection.execute(sql.SQL(migration.template).format(schema=identifier))
            await connection.execute(
                sql.SQL("INSERT INTO {}.schema_version (version, name) VALUES (%s, %s)").format(
                    identifier
                ),
                (migration.version, migration.name),
            )
            applied_now.append(migration.version)
    return applied_now


async def check(connection: AsyncConnection[Any], schema: str) -> list[int]:
    """The migration versions ``schema`` lacks (empty when it is current).

    Raises SchemaError, naming ``eventmill migrate``, when the schema is missing or has
    a version newer than this code knows; driver errors propagate.
    """
    cursor = await connection.execute(
        "SELECT EXISTS (SELECT FROM pg_tables"
        " WHERE schemaname = %s AND tablename = 'schema_version')",
        (schema,),
    )
    row = await cursor.fetchone()
    if row is None or not row[0]:
        raise SchemaError(
            f"the eventmill schema {schema!r} is not installed: run `eventmill migrate`"
        )
    cursor = await connection.execute(
        sql.SQL("SELECT version FROM {}.schema_version").format(sql.Identifier(schema))
    )
    applied = {version for (version,) in await cursor.fetchall()}
    known = {migration.version for migration in known_migrations()}
    newer = sorted(applied - known)
    if newer:
        raise SchemaError(
            f"schema {schema!r} has version {newer[-1]}, newer than this eventmill knows "
            f"({max(known, default=0)}); upgrade eventmill"
        )
    return sorted(known - applied)

"""Installing and upgrading the eventmill schema in PostgreSQL.

The schema ships as ordered migration files, ``migrations/NNNN_<what>.sql``, each a
template in which ``{schema}`` stands for the quoted schema name. ``install`` creates the
schema and its ``schema_version`` table when missing and applies, in order, every file
whose number is not recorded there yet, each in a transaction of its own. Every step
holds an advisory lock on the schema name (``MIGRATION_LOCK_CLASS``), taken by polling
so that a waiting installer holds no snapshot, so processes installing at the same
time queue instead of colliding; installing twice changes nothing. A database
recording a version newer than this code's files is refused.

A file whose first line is ``-- eventmill: no transaction`` builds indexes on tables
that may be large (``CREATE INDEX CONCURRENTLY IF NOT EXISTS``): its statements run one
by one outside any transaction, so publishes and reads go on meanwhile. It is
resumable: an index left invalid by an interrupted build is dropped and built again,
and the version is recorded only once every index of the schema is valid. In a schema
being created (no version recorded yet) it runs in a transaction like the others,
without ``CONCURRENTLY``: its tables are empty, and a concurrent build would wait for
every older transaction of the database. So the installer that creates a schema holds
the lock until every migration ran: no other installer sees it half created.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from psycopg import AsyncConnection, sql

from eventmill.backends.postgres.server_checks import check_server_version
from eventmill.errors import SchemaError

# Advisory lock class ids used by eventmill (first key of the two-integer form), one
# per purpose; docs/slow-database.md lists every advisory key eventmill takes.
PUBLISH_LOCK_CLASS = 1162690868  # publish's critical section, keyed by sequence oid
PUBLISHER_MARKER_CLASS = 1162690869  # publish's marker of version 0001, by sequence oid
VERSION_LOCK_CLASS = 1162690870  # projection version upkeep, keyed by hashtext(name)
MIGRATION_LOCK_CLASS = 1162690871  # schema installs, keyed by hashtext(schema name)

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
NO_TRANSACTION = "-- eventmill: no transaction"
"""The first line of a migration whose statements run one by one, outside a transaction."""
_LOCK_POLL = (0.01, 0.5)
"""First and longest wait between two attempts at the migration lock, in seconds."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Migration:
    """One migration file: its number, name and SQL template."""

    version: int
    name: str
    template: str

    @property
    def transactional(self) -> bool:
        """Whether the file runs in one transaction (else statement by statement)."""
        return not self.template.startswith(NO_TRANSACTION)

    def statements(self) -> list[str]:
        """The file's statements (each ends a line with ``;``), comments left out."""
        text = "\n".join(
            line for line in self.template.splitlines() if not line.lstrip().startswith("--")
        )
        return [part.strip() for part in re.split(r";\s*$", text, flags=re.M) if part.strip()]


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
    async with connection.transaction():
        await _lock(connection, schema, transaction=True)
        await connection.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(identifier))
        await connection.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.schema_version ("
                " version integer PRIMARY KEY,"
                " name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(identifier)
        )
        cursor = await connection.execute(
            sql.SQL("SELECT count(*) FROM {}.schema_version").format(identifier)
        )
        row = await cursor.fetchone()
    fresh = row is not None and row[0] == 0
    migrations = known_migrations()
    newest_known = max((migration.version for migration in migrations), default=0)
    applied_now: list[int] = []
    async with AsyncExitStack() as held:
        if fresh:
            # Hold the lock until the schema is complete: an installer that saw it half
            # created would take it for an existing store and build concurrently, which
            # waits for every older transaction of the database (the per-migration
            # transaction locks below are taken again by this session at once).
            await held.enter_async_context(_session_lock(connection, schema))
        for migration in migrations:
            if not migration.transactional and not fresh:
                async with _session_lock(connection, schema):
                    if await _pending(connection, schema, migration, newest_known):
                        await _build_concurrently(connection, schema, migration)
                        await _record(connection, schema, migration)
                        applied_now.append(migration.version)
                continue
            async with connection.transaction():
                await _lock(connection, schema, transaction=True)
                if not await _pending(connection, schema, migration, newest_known):
                    continue
                template = migration.template
                if not migration.transactional:  # a new schema: nothing to build concurrently
                    template = template.replace(" CONCURRENTLY", "")
                await connection.execute(sql.SQL(template).format(schema=identifier))
                await _record(connection, schema, migration)
                applied_now.append(migration.version)
    return applied_now


async def _lock(connection: AsyncConnection[Any], schema: str, *, transaction: bool) -> None:
    """Take the migration lock of ``schema`` (transaction- or session-level), polling."""
    function = "pg_try_advisory_xact_lock" if transaction else "pg_try_advisory_lock"
    attempt = sql.SQL("SELECT {}({}, hashtext({}))").format(
        sql.Identifier(function), sql.Literal(MIGRATION_LOCK_CLASS), sql.Literal(schema)
    )
    wait, longest = _LOCK_POLL
    while True:
        cursor = await connection.execute(attempt)
        row = await cursor.fetchone()
        if row is not None and row[0]:
            return
        await asyncio.sleep(wait)  # another process is migrating this schema
        wait = min(wait * 2, longest)


@asynccontextmanager
async def _session_lock(connection: AsyncConnection[Any], schema: str) -> AsyncIterator[None]:
    await _lock(connection, schema, transaction=False)
    try:
        yield
    finally:
        await connection.execute(
            sql.SQL("SELECT pg_advisory_unlock({}, hashtext({}))").format(
                sql.Literal(MIGRATION_LOCK_CLASS), sql.Literal(schema)
            )
        )


async def _pending(
    connection: AsyncConnection[Any], schema: str, migration: Migration, newest_known: int
) -> bool:
    """Whether ``migration`` is not recorded yet; raises SchemaError when the schema
    records a version newer than ``newest_known``."""
    cursor = await connection.execute(
        sql.SQL("SELECT version FROM {}.schema_version").format(sql.Identifier(schema))
    )
    applied = {row[0] for row in await cursor.fetchall()}
    newer = sorted(version for version in applied if version > newest_known)
    if newer:
        raise SchemaError(
            f"schema {schema!r} has version {newer[-1]}, newer than this eventmill "
            f"knows ({newest_known}); upgrade eventmill"
        )
    return migration.version not in applied


async def _record(connection: AsyncConnection[Any], schema: str, migration: Migration) -> None:
    await connection.execute(
        sql.SQL("INSERT INTO {}.schema_version (version, name) VALUES (%s, %s)").format(
            sql.Identifier(schema)
        ),
        (migration.version, migration.name),
    )


async def _invalid_indexes(connection: AsyncConnection[Any], schema: str) -> list[str]:
    cursor = await connection.execute(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND NOT i.indisvalid ORDER BY 1",
        (schema,),
    )
    return [row[0] for row in await cursor.fetchall()]


async def _build_concurrently(
    connection: AsyncConnection[Any], schema: str, migration: Migration
) -> None:
    """Run a no-transaction migration's statements one by one (autocommit), having
    dropped the indexes an interrupted build left invalid. Raises SchemaError when an
    index is still invalid afterwards."""
    identifier = sql.Identifier(schema)
    for name in await _invalid_indexes(connection, schema):
        await connection.execute(
            sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}.{}").format(
                identifier, sql.Identifier(name)
            )
        )
    for statement in migration.statements():
        await connection.execute(sql.SQL(statement).format(schema=identifier))
    invalid = await _invalid_indexes(connection, schema)
    if invalid:
        raise SchemaError(
            f"migration {migration.version} left invalid indexes in {schema!r}: "
            f"{', '.join(invalid)}; run `eventmill migrate` again"
        )


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

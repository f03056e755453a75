"""PostgresProjectionVersionStorage: versioned projections in
``{schema}.projection_versions``, each version's tables in a schema of its own, and a
read alias made of views.

For the projection ``order-summary`` of the backend schema ``eventmill``:

- version 2 keeps its tables in the schema ``eventmill__order_summary__v2``
  (``version_schema``); its processor creates and writes them there;
- readers query the alias schema ``eventmill__order_summary`` (``alias_schema``), which
  holds one view per table of the serving version (``SELECT * FROM`` that table).

``cut_over`` replaces the alias's views in the same transaction that records the new
serving version: a reader's query sees the old version's tables or the new one's,
never a mix, an empty table or a missing view (a query meeting the switch waits for
its commit and then reads the new view). ``retire`` drops a version's schema.
Every call that changes versions first takes a transaction-level advisory lock on the
projection's name, so nodes doing the same upkeep queue instead of colliding.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from psycopg import AsyncConnection, sql

from eventmill.backends.base import ProjectionVersion, ProjectionVersionStorage, VersionState
from eventmill.backends.postgres.schema import VERSION_LOCK_CLASS
from eventmill.errors import InvalidSettingsError

if TYPE_CHECKING:
    from eventmill.backends.postgres.backend import PostgresBackend

_COLUMNS = "name, version, state, declared_at, changed_at, retire_after, behind, eta_seconds"


def alias_schema(backend: PostgresBackend, name: str) -> str:
    """The schema of views readers of the projection ``name`` query."""
    return _schema_name(f"{backend.schema}__{name.replace('-', '_')}")


def version_schema(backend: PostgresBackend, name: str, version: int) -> str:
    """The schema holding the tables of ``version`` of the projection ``name``."""
    return _schema_name(f"{backend.schema}__{name.replace('-', '_')}__v{version}")


def _schema_name(text: str) -> str:
    if len(text) > 63 or not text.replace("_", "").isalnum() or not text.isascii():
        raise InvalidSettingsError(
            f"projection schema {text!r} is not a usable schema name (at most 63 lower-case "
            "letters, digits and _): use a shorter projection name of [a-z0-9_-]"
        )
    return text.lower()


def _record(row: tuple[Any, ...]) -> ProjectionVersion:
    name, version, state, declared_at, changed_at, retire_after, behind, eta = row
    return ProjectionVersion(
        name=name,
        version=version,
        state=VersionState(state),
        declared_at=declared_at,
        changed_at=changed_at,
        retire_after=retire_after,
        behind=behind,
        eta_seconds=eta,
    )


class PostgresProjectionVersionStorage(ProjectionVersionStorage):
    """Projection versions of one PostgresBackend."""

    def __init__(self, backend: PostgresBackend) -> None:
        self._backend = backend
        q = backend.sql
        self._lock = sql.SQL("SELECT pg_advisory_xact_lock({}, hashtext(%s))").format(
            sql.Literal(VERSION_LOCK_CLASS)
        )
        self._get = q(
            f"SELECT {_COLUMNS} FROM {{schema}}.projection_versions"
            " WHERE name = %s AND version = %s"
        )
        self._newer_done = q(
            "SELECT count(*) FROM {schema}.projection_versions"
            " WHERE name = %s AND version > %s AND state <> 'building'"
        )
        self._insert = q(
            "INSERT INTO {schema}.projection_versions (name, version, state)"
            f" VALUES (%s, %s, 'building') RETURNING {_COLUMNS}"
        )
        self._list = q(
            f"SELECT {_COLUMNS} FROM {{schema}}.projection_versions"
            " WHERE %(name)s::text IS NULL OR name = %(name)s ORDER BY name, version"
        )
        self._report = q(
            "UPDATE {schema}.projection_versions SET behind = %s, eta_seconds = %s"
            " WHERE name = %s AND version = %s AND state = 'building'"
        )
        self._retire_serving = q(
            "UPDATE {schema}.projection_versions SET state = 'retiring', changed_at = now(),"
            " retire_after = now() + %s WHERE name = %s AND state = 'serving'"
        )
        self._serve = q(
            "UPDATE {schema}.projection_versions SET state = 'serving', changed_at = now(),"
            " behind = 0, eta_seconds = NULL WHERE name = %s AND version = %s"
        )
        self._retired = q(
            "UPDATE {schema}.projection_versions SET state = 'retired', changed_at = now()"
            " WHERE name = %s AND version = %s AND (state = 'building' AND %s"
            " OR state = 'retiring' AND (%s OR retire_after <= now()))"
        )

    async def declare(self, name: str, version: int) -> ProjectionVersion:
        own = version_schema(self._backend, name, version)
        alias = alias_schema(self._backend, name)
        async with self._backend.connection() as connection, connection.transaction():
            await connection.execute(self._lock, (name,))
            cursor = await connection.execute(self._get, (name, version))
            row = await cursor.fetchone()
            if row is not None:
                return _record(row)
            cursor = await connection.execute(self._newer_done, (name, version))
            newer = await cursor.fetchone()
            if newer is not None and newer[0]:
                cursor = await connection.execute(sql.SQL("SELECT now()"))
                moment = await cursor.fetchone()
                assert moment is not None
                return ProjectionVersion(
                    name=name,
                    version=version,
                    state=VersionState.RETIRED,
                    declared_at=moment[0],
                    changed_at=moment[0],
                )
            for schema in (own, alias):
                await connection.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))
                )
            cursor = await connection.execute(self._insert, (name, version))
            created = await cursor.fetchone()
            assert created is not None
            return _record(created)

    async def versions(self, name: str | None = None) -> list[ProjectionVersion]:
        async with self._backend.connection() as connection:
            cursor = await connection.execute(self._list, {"name": name})
            rows = await cursor.fetchall()
        return [_record(row) for row in rows]

    async def report(
        self, name: str, version: int, *, behind: int, eta_seconds: float | None
    ) -> None:
        async with self._backend.connection() as connection:
            await connection.execute(self._report, (behind, eta_seconds, name, version))

    async def cut_over(self, name: str, version: int, *, grace: timedelta) -> bool:
        own = version_schema(self._backend, name, version)
        alias = alias_schema(self._backend, name)
        async with self._backend.connection() as connection, connection.transaction():
            await connection.execute(self._lock, (name,))
            cursor = await connection.execute(self._get, (name, version))
            row = await cursor.fetchone()
            if row is None or row[2] != VersionState.BUILDING.value:
                return False
            cursor = await connection.execute(self._newer_done, (name, version))
            newer = await cursor.fetchone()
            if newer is not None and newer[0]:
                return False
            await self._switch_views(connection, alias, own)
            await connection.execute(self._retire_serving, (grace, name))
            await connection.execute(self._serve, (name, version))
            return True

    async def _switch_views(self, connection: AsyncConnection[Any], alias: str, own: str) -> None:
        """Replace every view of ``alias`` by one per table of ``own``."""
        cursor = await connection.execute(
            "SELECT viewname FROM pg_views WHERE schemaname = %s ORDER BY viewname", (alias,)
        )
        for (view,) in await cursor.fetchall():
            await connection.execute(
                sql.SQL("DROP VIEW {}.{}").format(sql.Identifier(alias), sql.Identifier(view))
            )
        cursor = await connection.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY tablename", (own,)
        )
        for (table,) in await cursor.fetchall():
            await connection.execute(
                sql.SQL("CREATE VIEW {}.{} AS SELECT * FROM {}.{}").format(
                    sql.Identifier(alias),
                    sql.Identifier(table),
                    sql.Identifier(own),
                    sql.Identifier(table),
                )
            )

    async def retire(self, name: str, version: int, *, now: bool = False) -> bool:
        own = version_schema(self._backend, name, version)
        async with self._backend.connection() as connection, connection.transaction():
            await connection.execute(self._lock, (name,))
            cursor = await connection.execute(self._retired, (name, version, now, now))
            if cursor.rowcount != 1:
                return False
            await connection.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(own))
            )
            return True

"""PostgresProjectionStorage: projection states in ``{schema}.projections``.

``find`` filters with jsonb containment (``state @> '{"key": value}'``, served by a GIN
index), sorts on ``state -> key`` (JSON null and missing keys last, ties by id) and
pages with LIMIT/OFFSET. Given a transaction, every method runs on its connection, so
projection writes commit with the consumer's checkpoint.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb

from eventmill.backends.base import (
    ConsumerTransaction,
    Projection,
    ProjectionFilterValue,
    ProjectionStorage,
)
from eventmill.backends.postgres.checkpoints import PostgresConsumerTransaction
from eventmill.errors import InvalidInputError
from eventmill.events import JsonObject

if TYPE_CHECKING:
    from eventmill.backends.postgres.backend import PostgresBackend

_COLUMNS = "name, id, state, version, updated_at"


def _projection(row: tuple[Any, ...]) -> Projection:
    name, id, state, version, updated_at = row
    return Projection(name=name, id=id, state=state, version=version, updated_at=updated_at)


class PostgresProjectionStorage(ProjectionStorage):
    """Projection states of one PostgresBackend."""

    def __init__(self, backend: PostgresBackend) -> None:
        self._backend = backend
        self._get = backend.sql(
            f"SELECT {_COLUMNS} FROM {{schema}}.projections WHERE name = %s AND id = %s"
        )
        self._save = backend.sql(
            "INSERT INTO {schema}.projections AS p (name, id, state, version)"
            " VALUES (%s, %s, %s, 1) ON CONFLICT (name, id) DO UPDATE"
            " SET state = excluded.state, version = p.version + 1, updated_at = now()"
            f" RETURNING {_COLUMNS}"
        )
        self._delete = backend.sql(
            "DELETE FROM {schema}.projections WHERE name = %s AND id = %s RETURNING id"
        )

    @asynccontextmanager
    async def _connection(
        self, transaction: ConsumerTransaction | None
    ) -> AsyncIterator[AsyncConnection[Any]]:
        if transaction is None:
            async with self._backend.connection() as connection:
                yield connection
        elif isinstance(transaction, PostgresConsumerTransaction):
            yield transaction.connection
        else:
            raise InvalidInputError(f"not a transaction of this backend: {transaction!r:.80}")

    async def get(
        self, name: str, id: str, *, transaction: ConsumerTransaction | None = None
    ) -> Projection | None:
        async with self._connection(transaction) as connection:
            cursor = await connection.execute(self._get, (name, id))
            row = await cursor.fetchone()
        return None if row is None else _projection(row)

    async def save(
        self,
        name: str,
        id: str,
        state: JsonObject,
        *,
        transaction: ConsumerTransaction | None = None,
    ) -> Projection:
        async with self._connection(transaction) as connection:
            cursor = await connection.execute(self._save, (name, id, Jsonb(state)))
            row = await cursor.fetchone()
        assert row is not None
        return _projection(row)

    async def delete(
        self, name: str, id: str, *, transaction: ConsumerTransaction | None = None
    ) -> bool:
        async with self._connection(transaction) as connection:
            cursor = await connection.execute(self._delete, (name, id))
            row = await cursor.fetchone()
        return row is not None

    async def find(
        self,
        name: str,
        *,
        where: Mapping[str, ProjectionFilterValue] | None = None,
        order_by: str | None = None,
        descending: bool = False,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Projection]:
        query = [f"SELECT {_COLUMNS} FROM {{schema}}.projections WHERE name = %s"]
        parameters: list[Any] = [name]
        if where:
            query.append(" AND state @> %s")
            parameters.append(Jsonb(dict(where)))
        if order_by is None:
            query.append(" ORDER BY id")
        else:
            direction = "DESC" if descending else "ASC"
            query.append(f" ORDER BY nullif(state -> %s, 'null'::jsonb) {direction} NULLS LAST, id")
            parameters.append(order_by)
        query.append(" LIMIT %s OFFSET %s")
        parameters += [limit, offset]
        statement: sql.Composed = self._backend.sql("".join(query))
        async with self._backend.connection() as connection:
            cursor = await connection.execute(statement, parameters)
            rows = await cursor.fetchall()
        return [_projection(row) for row in rows]

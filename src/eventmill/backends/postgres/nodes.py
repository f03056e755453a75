"""PostgresNodeStateStore: which nodes are alive, in ``{schema}.nodes``; times are the
database's ``now()``. Each method is one statement."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from eventmill.backends.base import NodeRecord, NodeStateStore, check_age
from eventmill.events import check_name

if TYPE_CHECKING:
    from eventmill.backends.postgres.backend import PostgresBackend

_HEARTBEAT = (
    "INSERT INTO {schema}.nodes AS n (node_id, mode, started_at, last_seen, leader_term,"
    " leader_since) VALUES (%(node)s, %(mode)s, now(), now(), %(term)s::bigint,"
    " CASE WHEN %(term)s::bigint IS NULL THEN NULL ELSE now() END)"
    " ON CONFLICT (node_id) DO UPDATE SET mode = excluded.mode, last_seen = excluded.last_seen,"
    " leader_term = excluded.leader_term,"
    " leader_since = CASE WHEN excluded.leader_term IS NULL THEN NULL"
    " WHEN n.leader_term IS NOT DISTINCT FROM excluded.leader_term THEN n.leader_since"
    " ELSE excluded.leader_since END"
)


class PostgresNodeStateStore(NodeStateStore):
    """Node records of one PostgresBackend."""

    def __init__(self, backend: PostgresBackend) -> None:
        self._backend = backend
        sql = backend.sql
        self._heartbeat = sql(_HEARTBEAT)
        self._remove = sql("DELETE FROM {schema}.nodes WHERE node_id = %s")
        self._list = sql(
            "SELECT node_id, mode, started_at, last_seen, leader_term, leader_since"
            " FROM {schema}.nodes ORDER BY node_id"
        )
        self._purge = sql("DELETE FROM {schema}.nodes WHERE last_seen < now() - %s")

    async def heartbeat(self, node_id: str, mode: str, *, leader_term: int | None) -> None:
        check_name(node_id, "node id")
        async with self._backend.connection() as connection:
            await connection.execute(
                self._heartbeat, {"node": node_id, "mode": mode, "term": leader_term}
            )

    async def remove(self, node_id: str) -> None:
        async with self._backend.connection() as connection:
            await connection.execute(self._remove, (node_id,))

    async def list(self) -> list[NodeRecord]:
        async with self._backend.connection() as connection:
            cursor = await connection.execute(self._list)
            rows = await cursor.fetchall()
        return [
            NodeRecord(
                node_id=row[0],
                mode=row[1],
                started_at=row[2],
                last_seen=row[3],
                leader_term=row[4],
                leader_since=row[5],
            )
            for row in rows
        ]

    async def purge(self, max_age: timedelta) -> int:
        check_age(max_age, "max_age")
        async with self._backend.connection() as connection:
            cursor = await connection.execute(self._purge, (max_age,))
            return cursor.rowcount

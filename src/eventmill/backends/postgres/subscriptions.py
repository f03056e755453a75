"""PostgresSubscriptionStateStore: who holds what, in ``{schema}.subscriptions``.

``apply`` runs in one transaction: it first locks the existing rows it touches in key
order (so concurrent batches queue instead of deadlocking), then makes one set-based
statement per kind of change. An Assign only overwrites a row whose epoch is lower; if
any Assign wrote nothing, the transaction is rolled back and ConflictError raised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from eventmill.backends.base import (
    Assign,
    HoldingState,
    Release,
    Remove,
    Revoke,
    SourceHolding,
    SubscriptionChange,
    SubscriptionStateStore,
    check_changes,
)
from eventmill.errors import ConflictError
from eventmill.events import identifier_from_json, source_key

if TYPE_CHECKING:
    from eventmill.backends.postgres.backend import PostgresBackend

_TOUCHED = "unnest(%s::text[], %s::text[]) AS c(g, k)"
_MATCH = "s.group_name = c.g AND s.source_key = c.k"


class PostgresSubscriptionStateStore(SubscriptionStateStore):
    """Holdings of one PostgresBackend."""

    def __init__(self, backend: PostgresBackend) -> None:
        self._backend = backend
        sql = backend.sql
        self._list = sql(
            "SELECT group_name, source, subscriber_id, node_id, epoch, state"
            " FROM {schema}.subscriptions"
            " WHERE (%(group)s::text IS NULL OR group_name = %(group)s)"
            " AND (%(node)s::text IS NULL OR node_id = %(node)s)"
            ' ORDER BY group_name COLLATE "C", source_key COLLATE "C"'
        )
        self._lock_rows = sql(
            f"SELECT 1 FROM {{schema}}.subscriptions s JOIN {_TOUCHED} ON {_MATCH}"
            " ORDER BY s.group_name, s.source_key FOR UPDATE OF s"
        )
        self._remove = sql(
            f"DELETE FROM {{schema}}.subscriptions s USING {_TOUCHED} WHERE {_MATCH}"
        )
        self._revoke = sql(
            f"UPDATE {{schema}}.subscriptions s SET state = 'revoking' FROM {_TOUCHED}"
            f" WHERE {_MATCH} AND s.state = 'assigned'"
        )
        self._release = sql(
            "UPDATE {schema}.subscriptions s"
            " SET subscriber_id = NULL, node_id = NULL, state = 'released'"
            " FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[])"
            " AS c(g, k, holder, epoch)"
            f" WHERE {_MATCH} AND s.subscriber_id = c.holder"
            " AND (c.epoch IS NULL OR s.epoch = c.epoch)"
        )
        self._assign = sql(
            "WITH written AS ("
            " INSERT INTO {schema}.subscriptions AS s"
            " (group_name, source_key, source, subscriber_id, node_id, epoch, state)"
            " SELECT c.g, c.k, c.k::jsonb, c.holder, c.node, c.epoch, 'assigned'"
            " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::bigint[])"
            " WITH ORDINALITY AS c(g, k, holder, node, epoch, n) ORDER BY c.n"
            " ON CONFLICT (group_name, source_key) DO UPDATE"
            " SET subscriber_id = excluded.subscriber_id, node_id = excluded.node_id,"
            " epoch = excluded.epoch, state = 'assigned'"
            " WHERE s.epoch < excluded.epoch RETURNING 1)"
            " SELECT count(*) FROM written"
        )

    async def list(
        self, *, group: str | None = None, node_id: str | None = None
    ) -> list[SourceHolding]:
        async with self._backend.connection() as connection:
            cursor = await connection.execute(self._list, {"group": group, "node": node_id})
            rows = await cursor.fetchall()
        return [_holding(row) for row in rows]

    async def apply(self, changes: Sequence[SubscriptionChange]) -> None:
        checked = sorted(
            (
                (change.group, source_key(change.source), change)
                for change in check_changes(changes)
            ),
            key=lambda item: (item[0], item[1]),
        )
        if not checked:
            return
        groups = [group for group, _, _ in checked]
        keys = [key for _, key, _ in checked]
        assigns = [(g, k, c) for g, k, c in checked if isinstance(c, Assign)]
        async with self._backend.connection() as connection, connection.transaction():
            await connection.execute(self._lock_rows, (groups, keys))
            for kind, statement in ((Remove, self._remove), (Revoke, self._revoke)):
                chosen = [(g, k) for g, k, c in checked if isinstance(c, kind)]
                if chosen:
                    await connection.execute(statement, _columns(chosen, 2))
            releases = [
                (g, k, c.subscriber_id, c.epoch) for g, k, c in checked if isinstance(c, Release)
            ]
            if releases:
                await connection.execute(self._release, _columns(releases, 4))
            if assigns:
                rows = [(g, k, c.subscriber_id, c.node_id, c.epoch) for g, k, c in assigns]
                cursor = await connection.execute(self._assign, _columns(rows, 5))
                written = await cursor.fetchone()
                if written is None or written[0] != len(assigns):
                    raise ConflictError(
                        "an assignment's epoch is not greater than the source's current epoch"
                        " (another coordinator changed it): nothing applied"
                    )


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [[row[index] for row in rows] for index in range(width)]


def _holding(row: tuple[Any, ...]) -> SourceHolding:
    group, source, subscriber_id, node_id, epoch, state = row
    return SourceHolding(
        group=group,
        source=identifier_from_json(source),
        subscriber_id=subscriber_id,
        node_id=node_id,
        epoch=epoch,
        state=HoldingState(state),
    )

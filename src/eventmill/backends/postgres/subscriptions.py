"""PostgresSubscriptionStateStore: who holds what, in ``{schema}.subscriptions``.

``apply`` runs in one transaction: it first locks the existing rows it touches in key
order (so concurrent batches queue instead of deadlocking), then makes one set-based
statement per kind of change. An Assign only overwrites a row whose epoch is lower; if
any Assign wrote nothing, the transaction is rolled back and ConflictError raised.

Takeovers (``holder_dead_after``): before writing, one upsert locks the record of each
holder taken from, in ``{schema}.subscribers`` (in (group, id) order, as
``heartbeat_all`` writes), creating it dead (last seen just over the age before the
freshest record, no requests, purged like any dead record) if it was purged. A
heartbeat of that holder (an UPDATE, or an INSERT meeting the uncommitted row) then
waits for this commit, and one that committed first is seen: its holder counts as live
(as ``SubscriberStateStore.list`` counts it), and the change becomes a Revoke. ``now()``
is the transaction's start, so a late check only errs towards live.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeAlias

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
from eventmill.backends.postgres.subscribers import live_since
from eventmill.errors import ConflictError
from eventmill.events import identifier_from_json, source_key

if TYPE_CHECKING:
    from eventmill.backends.postgres.backend import PostgresBackend

_Keyed: TypeAlias = list[tuple[str, str, SubscriptionChange]]
"""Changes with their group and source key."""

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
            "SELECT s.group_name, s.source_key, s.subscriber_id, s.node_id, s.epoch"
            f" FROM {{schema}}.subscriptions s JOIN {_TOUCHED} ON {_MATCH}"
            " ORDER BY s.group_name, s.source_key FOR UPDATE OF s"
        )
        self._lock_holders = sql(
            "INSERT INTO {schema}.subscribers AS r (group_name, subscriber_id, node_id,"
            " subscription_requests, registered_at, last_seen)"
            " SELECT c.g, c.i, c.node, '[]', now(), t.since - c.age - interval '1 microsecond'"
            " FROM unnest(%s::text[], %s::text[], %s::text[], %s::interval[])"
            " WITH ORDINALITY AS c(g, i, node, age, n)"
            f" CROSS JOIN LATERAL (SELECT {live_since('c.age')} AS since) t ORDER BY c.n"
            " ON CONFLICT (group_name, subscriber_id) DO UPDATE SET last_seen = r.last_seen"
            " RETURNING r.group_name, r.subscriber_id, r.node_id, r.last_seen, now(),"
            " (SELECT max(last_seen) FROM {schema}.subscribers)"
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
        async with self._backend.connection() as connection, connection.transaction():
            cursor = await connection.execute(self._lock_rows, (groups, keys))
            locked = {(row[0], row[1]): row[2:] for row in await cursor.fetchall()}
            checked = await self._check_takeovers(connection, checked, locked)
            assigns = [(g, k, c) for g, k, c in checked if isinstance(c, Assign)]
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

    async def _check_takeovers(
        self,
        connection: Any,
        checked: _Keyed,
        rows: dict[tuple[str, str], tuple[Any, ...]],
    ) -> _Keyed:
        """``checked`` with every takeover from a holder that is live again turned into
        a Revoke, having locked (or created dead) the record of each holder taken from.
        ``rows`` are the locked holdings: (subscriber id, node id, epoch) by key."""
        takeovers = {
            index: taken
            for index, (group, key, change) in enumerate(checked)
            if (taken := _taken_from(change, rows.get((group, key)))) is not None
        }
        if not takeovers:
            return checked
        ages: dict[tuple[str, str], tuple[str, timedelta]] = {}
        for index, (holder, node_id, age) in takeovers.items():
            group = checked[index][0]
            _, known = ages.get((group, holder), (node_id, age))
            ages[group, holder] = (node_id, max(age, known))
        entries = [(g, i, *ages[g, i]) for g, i in sorted(ages)]
        cursor = await connection.execute(self._lock_holders, _columns(entries, 4))
        records = {(row[0], row[1]): row[2:] for row in await cursor.fetchall()}
        result: _Keyed = [*checked]
        for index, (holder, node_id, age) in takeovers.items():
            group, key, change = checked[index]
            record_node, last_seen, now, freshest = records[group, holder]
            since = max(now - age, min(now, freshest or now))  # as live_since says
            if record_node == node_id and last_seen >= since - age:
                result[index] = (group, key, Revoke(group=group, source=change.source))
        return result


def _taken_from(
    change: SubscriptionChange, holding: tuple[Any, ...] | None
) -> tuple[str, str, timedelta] | None:
    """(holder, its node, the age it was judged dead by) when ``change`` is a takeover
    of a held source (and, for an Assign, raises its epoch: else the batch fails)."""
    if not isinstance(change, Assign | Release) or change.holder_dead_after is None:
        return None
    if holding is None or holding[0] is None:
        return None
    holder, node_id, epoch = holding
    if isinstance(change, Assign) and change.epoch <= epoch:
        return None
    return holder, node_id, change.holder_dead_after


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

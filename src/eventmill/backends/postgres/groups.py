"""PostgresGroupStorage: whole groups across ``{schema}.subscribers``,
``{schema}.subscriptions`` and ``{schema}.checkpoints`` (``retire`` also deletes the
group's parked streams, ``reset`` those its replay reaches again; its record of skipped
events stays).

``retire`` and ``reset`` each run in one transaction that locks the rows it changes in
the order ``apply`` and the coordinator use (holdings, then subscriber records, then
checkpoints, each in key order), so they queue behind concurrent broker writes instead
of deadlocking. A row locked longer than GROUP_LOCK_TIMEOUT (e.g. by a frozen holder's
batch) fails the call with ConflictError, changing nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from eventmill.backends.base import Checkpoint, GroupStorage, GroupSummary, check_requests
from eventmill.backends.postgres.checkpoints import CHECKPOINT_COLUMNS, checkpoint_from_row
from eventmill.errors import ConflictError, GroupInUseError
from eventmill.events import (
    EventSourceIdentifier,
    StreamIdentifier,
    check_name,
    identifier_from_json,
    source_key,
)

if TYPE_CHECKING:
    from eventmill.backends.postgres.backend import PostgresBackend

GROUP_LOCK_TIMEOUT = timedelta(seconds=5)
"""How long ``retire`` and ``reset`` wait for a row another transaction holds locked."""


class PostgresGroupStorage(GroupStorage):
    """Groups of one PostgresBackend."""

    def __init__(self, backend: PostgresBackend) -> None:
        self._backend = backend
        sql = backend.sql
        self._counts = sql(
            "SELECT g, sum(n)::int, sum(live)::int, sum(h)::int, sum(c)::int FROM ("
            " SELECT group_name, 1, (last_seen >= now() - %(age)s)::int, 0, 0"
            " FROM {schema}.subscribers"
            " UNION ALL SELECT group_name, 0, 0, 1, 0 FROM {schema}.subscriptions"
            " UNION ALL SELECT group_name, 0, 0, 0, 1 FROM {schema}.checkpoints"
            ") AS t (g, n, live, h, c)"
            " WHERE %(group)s::text IS NULL OR g = %(group)s"
            ' GROUP BY g ORDER BY g COLLATE "C"'
        )
        milliseconds = round(GROUP_LOCK_TIMEOUT.total_seconds() * 1000)
        self._lock_timeout = f"SET LOCAL lock_timeout = {milliseconds:d}"
        self._lock_holdings = sql(
            "SELECT source_key, epoch, state FROM {schema}.subscriptions"
            " WHERE group_name = %s AND (%s::text[] IS NULL OR source_key = ANY(%s))"
            " ORDER BY source_key FOR UPDATE"
        )
        self._lock_records = sql(
            "SELECT subscriber_id FROM {schema}.subscribers WHERE group_name = %s"
            " ORDER BY subscriber_id FOR UPDATE"
        )
        self._lock_checkpoints = sql(
            "SELECT source_key, source, epoch FROM {schema}.checkpoints"
            " WHERE group_name = %s AND (%s::text[] IS NULL OR source_key = ANY(%s))"
            " ORDER BY source_key FOR UPDATE"
        )
        self._delete = [
            sql("DELETE FROM {schema}.subscriptions WHERE group_name = %s"),
            sql("DELETE FROM {schema}.subscribers WHERE group_name = %s"),
            sql("DELETE FROM {schema}.checkpoints WHERE group_name = %s"),
            sql("DELETE FROM {schema}.parked_streams WHERE group_name = %s"),
        ]
        self._revoke = sql(
            "UPDATE {schema}.subscriptions s SET epoch = c.e,"
            " state = CASE s.state WHEN 'assigned' THEN 'revoking' ELSE s.state END"
            " FROM unnest(%s::text[], %s::bigint[]) AS c (k, e)"
            " WHERE s.group_name = %s AND s.source_key = c.k"
        )
        self._move = sql(
            "INSERT INTO {schema}.checkpoints AS c"
            " (group_name, source_key, source, after_place, version, epoch, reset_pending)"
            " SELECT %s, k, s, a, 1, e, true"
            " FROM unnest(%s::text[], %s::jsonb[], %s::bigint[], %s::bigint[]) AS u (k, s, a, e)"
            " ON CONFLICT (group_name, source_key) DO UPDATE"
            " SET after_place = excluded.after_place, version = c.version + 1,"
            " epoch = excluded.epoch, reset_pending = true, updated_at = now()"
            f" RETURNING {CHECKPOINT_COLUMNS}"
        )
        self._unpark = sql(
            "DELETE FROM {schema}.parked_streams p"
            " USING unnest(%s::text[], %s::bigint[], %s::boolean[]) AS t (k, a, by_position)"
            " WHERE p.group_name = %s AND p.source_key = t.k AND (t.a IS NULL"
            " OR CASE WHEN t.by_position THEN p.position ELSE p.sequence_number END > t.a)"
        )
        self._stream_place = sql(
            "SELECT max(position) FROM {schema}.events"
            " WHERE category = %s AND stream = %s AND sequence_number <= %s"
        )
        self._sequence_before = sql(
            "SELECT coalesce("
            " (SELECT min(sequence_number) - 1 FROM {schema}.events WHERE observed_at >= %s),"
            " (SELECT max(sequence_number) FROM {schema}.events))"
        )

    async def overview(self, *, max_age: timedelta) -> list[GroupSummary]:
        async with self._backend.connection() as connection:
            cursor = await connection.execute(self._counts, {"age": max_age, "group": None})
            rows = await cursor.fetchall()
        return [_summary(row) for row in rows]

    async def retire(self, group: str, *, max_age: timedelta) -> GroupSummary:
        check_name(group, "group")
        async with self._backend.connection() as connection:
            try:
                async with connection.transaction():
                    await connection.execute(self._lock_timeout)
                    await connection.execute(self._lock_holdings, (group, None, None))
                    await connection.execute(self._lock_records, (group,))
                    await connection.execute(self._lock_checkpoints, (group, None, None))
                    cursor = await connection.execute(
                        self._counts, {"age": max_age, "group": group}
                    )
                    row = await cursor.fetchone()
                    if row is None:
                        return GroupSummary(
                            group=group, subscribers=0, live=0, holdings=0, checkpoints=0
                        )
                    found = _summary(row)
                    if found.live:
                        raise GroupInUseError(
                            f"group {group!r} has {found.live} live subscribers: stop them first"
                        )
                    for statement in self._delete:
                        await connection.execute(statement, (group,))
                    return found
            except psycopg.errors.LockNotAvailable as error:
                raise ConflictError(
                    f"group {group!r}: rows stayed locked for {GROUP_LOCK_TIMEOUT}; try again"
                ) from error

    async def reset(
        self,
        group: str,
        *,
        after: int | None,
        sources: Sequence[EventSourceIdentifier] | None = None,
    ) -> list[Checkpoint]:
        check_name(group, "group")
        chosen = None if sources is None else check_requests(sources)
        keys = None if chosen is None else [source_key(source) for source in chosen]
        async with self._backend.connection() as connection:
            try:
                async with connection.transaction():
                    return await self._reset(connection, group, after, chosen, keys)
            except psycopg.errors.LockNotAvailable as error:
                raise ConflictError(
                    f"group {group!r}: rows stayed locked for {GROUP_LOCK_TIMEOUT}; try again"
                ) from error

    async def _reset(
        self,
        connection: AsyncConnection[Any],
        group: str,
        after: int | None,
        chosen: tuple[EventSourceIdentifier, ...] | None,
        keys: list[str] | None,
    ) -> list[Checkpoint]:
        await connection.execute(self._lock_timeout)
        cursor = await connection.execute(self._lock_holdings, (group, keys, keys))
        epochs = {key: epoch for key, epoch, _ in await cursor.fetchall()}
        cursor = await connection.execute(self._lock_checkpoints, (group, keys, keys))
        known: dict[str, EventSourceIdentifier] = {}
        for key, source, epoch in await cursor.fetchall():
            epochs[key] = max(epochs.get(key, 0), epoch)
            known[key] = identifier_from_json(source)
        if chosen is None:
            for key in epochs.keys() - known.keys():
                known[key] = identifier_from_json(json.loads(key))
            chosen = tuple(known.values())
        targets = sorted({source_key(source): source for source in chosen}.items())
        if not targets:
            return []
        new_epochs = [epochs.get(key, 0) + 1 for key, _ in targets]
        places = [await self._place(connection, source, after) for _, source in targets]
        target_keys = [key for key, _ in targets]
        await connection.execute(self._revoke, (target_keys, new_epochs, group))
        by_position = [isinstance(source, StreamIdentifier) for _, source in targets]
        await connection.execute(self._unpark, (target_keys, places, by_position, group))
        cursor = await connection.execute(
            self._move,
            (
                group,
                target_keys,
                [Jsonb(source.to_json()) for _, source in targets],
                places,
                new_epochs,
            ),
        )
        return sorted(
            (checkpoint_from_row(row) for row in await cursor.fetchall()),
            key=lambda checkpoint: source_key(checkpoint.source),
        )

    async def _place(
        self, connection: AsyncConnection[Any], source: EventSourceIdentifier, after: int | None
    ) -> int | None:
        if after is None or not isinstance(source, StreamIdentifier):
            return after
        cursor = await connection.execute(
            self._stream_place, (source.category, source.stream, after)
        )
        row = await cursor.fetchone()
        return None if row is None else row[0]

    async def sequence_before(self, time: datetime) -> int | None:
        async with self._backend.connection() as connection:
            cursor = await connection.execute(self._sequence_before, (time,))
            row = await cursor.fetchone()
        return None if row is None else row[0]


def _summary(row: tuple[Any, ...]) -> GroupSummary:
    group, subscribers, live, holdings, checkpoints = row
    return GroupSummary(
        group=group, subscribers=subscribers, live=live, holdings=holdings, checkpoints=checkpoints
    )

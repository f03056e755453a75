"""PostgresParkedStreamStorage: parked streams in ``{schema}.parked_streams`` and
skipped events in ``{schema}.skipped_events``.

Every write is one statement; given a transaction it runs on that transaction's
connection, so it commits with the consumer's checkpoint and the processor's writes.
A holder's write is fenced in the same statement: it share-locks the checkpoint row of
(group, source) (so a concurrent fence waits for it, or it for the fence) and writes
only if that row's epoch is not newer than the writer's. Only a write that changed no
row reads the checkpoint again, to tell a stale epoch (StaleEpochError) from a missing
record. A consumer reads the markers of its group with one indexed query per pass.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from eventmill.backends.base import (
    ConsumerTransaction,
    ParkedRequest,
    ParkedStream,
    ParkedStreamStorage,
    SkippedEvent,
)
from eventmill.backends.postgres.checkpoints import PostgresConsumerTransaction
from eventmill.errors import InvalidInputError, StaleEpochError
from eventmill.events import (
    EventSourceIdentifier,
    StreamIdentifier,
    identifier_from_json,
    source_key,
)

if TYPE_CHECKING:
    from eventmill.backends.postgres.backend import PostgresBackend

_PARKED_COLUMNS = (
    "group_name, source, category, stream, sequence_number, position, event_name, held,"
    " last_held, error_type, error_message, traceback, attempts, first_failed_at,"
    " last_failed_at, request, skip_through"
)
_SKIPPED_COLUMNS = (
    "group_name, source, category, stream, sequence_number, position, event_name, reason,"
    " error_type, error_message, skipped_at"
)
_KEY = "group_name = %s AND source_key = %s AND category = %s AND stream = %s"
_FENCE = (
    "WITH fence AS (SELECT epoch FROM {schema}.checkpoints"
    " WHERE group_name = %s AND source_key = %s FOR SHARE) "
)
"""Prefix of a fenced write; its parameters are the group and source key, and the
write's ``_FENCED`` condition takes the writer's epoch (None: not fenced)."""
_FENCED = "NOT EXISTS (SELECT 1 FROM fence WHERE epoch > %s::bigint)"


def _parked(row: tuple[Any, ...]) -> ParkedStream:
    (group, source, category, stream, sequence_number, position, name, held, last_held) = row[:9]
    (error_type, message, traceback, attempts, first, last, request, through) = row[9:]
    return ParkedStream(
        group=group,
        source=identifier_from_json(source),
        stream=StreamIdentifier(category, stream),
        sequence_number=sequence_number,
        position=position,
        event_name=name,
        held=held,
        last_held=last_held,
        error_type=error_type,
        error_message=message,
        traceback=traceback,
        attempts=attempts,
        first_failed_at=first,
        last_failed_at=last,
        request=None if request is None else ParkedRequest(request),
        skip_through=through,
    )


def _skipped(row: tuple[Any, ...]) -> SkippedEvent:
    group, source, category, stream, sequence_number, position, name, reason = row[:8]
    error_type, message, skipped_at = row[8:]
    return SkippedEvent(
        group=group,
        source=identifier_from_json(source),
        stream=StreamIdentifier(category, stream),
        sequence_number=sequence_number,
        position=position,
        event_name=name,
        reason=reason,
        error_type=error_type,
        error_message=message,
        skipped_at=skipped_at,
    )


class PostgresParkedStreamStorage(ParkedStreamStorage):
    """Parked streams and skipped events of one PostgresBackend."""

    def __init__(self, backend: PostgresBackend) -> None:
        self._backend = backend
        sql = backend.sql
        self._park = sql(
            _FENCE + "INSERT INTO {schema}.parked_streams"
            f" (source_key, {_PARKED_COLUMNS})"
            " SELECT %s::text, %s::text, %s::jsonb, %s::text, %s::text, %s::bigint, %s::bigint,"
            " %s::text, %s::bigint, %s::bigint, %s::text, %s::text, %s::text, %s::integer,"
            " %s::timestamptz, %s::timestamptz, %s::text, %s::bigint"
            f" WHERE {_FENCED}"
            " ON CONFLICT (group_name, source_key, category, stream) DO UPDATE SET"
            " sequence_number = excluded.sequence_number, position = excluded.position,"
            " event_name = excluded.event_name, held = excluded.held,"
            " last_held = excluded.last_held, error_type = excluded.error_type,"
            " error_message = excluded.error_message, traceback = excluded.traceback,"
            " attempts = excluded.attempts, first_failed_at = excluded.first_failed_at,"
            " last_failed_at = excluded.last_failed_at"
        )
        self._clear_request = sql(
            _FENCE + "UPDATE {schema}.parked_streams SET request = NULL, skip_through = NULL"
            f" WHERE {_KEY} AND request = %s AND {_FENCED}"
        )
        self._hold = sql(
            _FENCE + "UPDATE {schema}.parked_streams SET"
            " held = held + (SELECT count(*) FROM unnest(%s::bigint[]) AS p WHERE p > last_held),"
            " last_held = greatest(last_held, (SELECT max(p) FROM unnest(%s::bigint[]) AS p))"
            f" WHERE {_KEY} AND {_FENCED} RETURNING held"
        )
        self._remove = sql(
            _FENCE + f"DELETE FROM {{schema}}.parked_streams WHERE {_KEY} AND {_FENCED}"
        )
        self._epoch = sql(
            "SELECT epoch FROM {schema}.checkpoints WHERE group_name = %s AND source_key = %s"
        )
        order = " ORDER BY group_name, source_key, category, stream"
        select = f"SELECT {_PARKED_COLUMNS} FROM {{schema}}.parked_streams"
        self._list_all = sql(select + order)
        self._list_group = sql(select + " WHERE group_name = %s" + order)
        self._list_source = sql(select + " WHERE source_key = %s" + order)
        self._list_group_source = sql(select + " WHERE group_name = %s AND source_key = %s" + order)
        self._request = sql(
            "UPDATE {schema}.parked_streams SET request = %s, skip_through = %s"
            " WHERE group_name = %s AND category = %s AND stream = %s"
        )
        self._record_skipped = sql(
            _FENCE + f"INSERT INTO {{schema}}.skipped_events ({_SKIPPED_COLUMNS})"
            " SELECT %s::text, %s::jsonb, %s::text, %s::text, %s::bigint, %s::bigint, %s::text,"
            f" %s::text, %s::text, %s::text, %s::timestamptz WHERE {_FENCED}"
        )
        skipped = f"SELECT {_SKIPPED_COLUMNS} FROM {{schema}}.skipped_events"
        self._skipped_all = sql(skipped + " ORDER BY group_name, skipped_at, id")
        self._skipped_group = sql(skipped + " WHERE group_name = %s ORDER BY skipped_at, id")

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

    async def _refuse_if_stale(
        self,
        connection: AsyncConnection[Any],
        group: str,
        source: EventSourceIdentifier,
        epoch: int | None,
    ) -> None:
        """After a fenced write changed no row: raise StaleEpochError if the checkpoint
        of (group, source) is at a newer epoch than ``epoch``."""
        if epoch is None:
            return
        cursor = await connection.execute(self._epoch, (group, source_key(source)))
        row = await cursor.fetchone()
        if row is not None and row[0] > epoch:
            raise StaleEpochError(
                f"parked streams of {group!r} in {source}: epoch {epoch} is older than {row[0]}"
            )

    async def park(
        self,
        record: ParkedStream,
        *,
        transaction: ConsumerTransaction | None = None,
        epoch: int | None = None,
    ) -> None:
        key = source_key(record.source)
        parameters = (
            record.group,
            key,
            key,
            record.group,
            Jsonb(record.source.to_json()),
            record.stream.category,
            record.stream.stream,
            record.sequence_number,
            record.position,
            record.event_name,
            record.held,
            record.last_held,
            record.error_type,
            record.error_message,
            record.traceback,
            record.attempts,
            record.first_failed_at,
            record.last_failed_at,
            None if record.request is None else record.request.value,
            record.skip_through,
            epoch,
        )
        async with self._connection(transaction) as connection:
            cursor = await connection.execute(self._park, parameters)
            if cursor.rowcount == 0:
                await self._refuse_if_stale(connection, record.group, record.source, epoch)

    async def hold(
        self,
        group: str,
        source: EventSourceIdentifier,
        stream: StreamIdentifier,
        places: Sequence[int],
        *,
        transaction: ConsumerTransaction | None = None,
        epoch: int | None = None,
    ) -> int | None:
        listed = list(places)
        key = (group, source_key(source), stream.category, stream.stream)
        async with self._connection(transaction) as connection:
            cursor = await connection.execute(self._hold, (*key[:2], listed, listed, *key, epoch))
            row = await cursor.fetchone()
            if row is None:
                await self._refuse_if_stale(connection, group, source, epoch)
        return None if row is None else int(row[0])

    async def remove(
        self,
        group: str,
        source: EventSourceIdentifier,
        stream: StreamIdentifier,
        *,
        transaction: ConsumerTransaction | None = None,
        epoch: int | None = None,
    ) -> bool:
        key = source_key(source)
        parameters = (group, key, group, key, stream.category, stream.stream, epoch)
        async with self._connection(transaction) as connection:
            cursor = await connection.execute(self._remove, parameters)
            if cursor.rowcount == 0:
                await self._refuse_if_stale(connection, group, source, epoch)
            return cursor.rowcount == 1

    async def request(
        self,
        group: str,
        stream: StreamIdentifier,
        request: ParkedRequest,
        *,
        skip_through: int | None = None,
    ) -> int:
        parameters = (request.value, skip_through, group, stream.category, stream.stream)
        async with self._backend.connection() as connection:
            cursor = await connection.execute(self._request, parameters)
            return cursor.rowcount

    async def clear_request(
        self,
        group: str,
        source: EventSourceIdentifier,
        stream: StreamIdentifier,
        request: ParkedRequest,
        *,
        epoch: int | None = None,
    ) -> bool:
        key = source_key(source)
        parameters = (group, key, group, key, stream.category, stream.stream, request.value, epoch)
        async with self._backend.connection() as connection:
            cursor = await connection.execute(self._clear_request, parameters)
            if cursor.rowcount == 0:
                await self._refuse_if_stale(connection, group, source, epoch)
            return cursor.rowcount == 1

    async def record_skipped(
        self,
        event: SkippedEvent,
        *,
        transaction: ConsumerTransaction | None = None,
        epoch: int | None = None,
    ) -> None:
        parameters = (
            event.group,
            source_key(event.source),
            event.group,
            Jsonb(event.source.to_json()),
            event.stream.category,
            event.stream.stream,
            event.sequence_number,
            event.position,
            event.event_name,
            event.reason,
            event.error_type,
            event.error_message,
            event.skipped_at,
            epoch,
        )
        async with self._connection(transaction) as connection:
            cursor = await connection.execute(self._record_skipped, parameters)
            if cursor.rowcount == 0:
                await self._refuse_if_stale(connection, event.group, event.source, epoch)

    async def skipped(self, *, group: str | None = None) -> list[SkippedEvent]:
        async with self._backend.connection() as connection:
            if group is None:
                cursor = await connection.execute(self._skipped_all)
            else:
                cursor = await connection.execute(self._skipped_group, (group,))
            rows = await cursor.fetchall()
        return [_skipped(row) for row in rows]

    async def list(
        self, *, group: str | None = None, source: EventSourceIdentifier | None = None
    ) -> list[ParkedStream]:
        async with self._backend.connection() as connection:
            if group is None and source is None:
                cursor = await connection.execute(self._list_all)
            elif source is None:
                cursor = await connection.execute(self._list_group, (group,))
            elif group is None:
                cursor = await connection.execute(self._list_source, (source_key(source),))
            else:
                cursor = await connection.execute(
                    self._list_group_source, (group, source_key(source))
                )
            rows = await cursor.fetchall()
        return [_parked(row) for row in rows]

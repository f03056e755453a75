"""PostgresCheckpointStorage: checkpoints in ``{schema}.checkpoints``.

One row per (group, source key); a save is one conditional ``UPDATE`` (or ``INSERT ...
ON CONFLICT DO NOTHING`` for the first) that checks the version and the epoch in the
same statement, so the common case is a single round trip. Only when it changes no row
is the row read again to tell a stale epoch from a lost race. A fence waits at most
FENCE_LOCK_TIMEOUT for a row another transaction holds locked.

A drain saves every ``checkpoint_every`` events, one save after the other, and each
save's client CPU adds to the drain's (docs/performance.md): the save's statements are
bytes made once (psycopg renders a composed query at every execution) and prepared
from the first use, and an ``UPDATE`` returns only what it changed (version, epoch,
time), the rest of the Checkpoint being what the caller gave (no JSON to decode).

``transaction()`` opens a transaction on a pool connection: a
``TransactionalEventProcessor`` writes through ``transaction.connection`` and the
checkpoint is saved on the same connection before the one commit (exactly-once).
Consumers holding an ownership lease bound it by the lease margin: the server ends
the transaction of a holder that froze or was cut off inside it (its session idle, or
one statement running, for longer than the margin), so the checkpoint row it locked
is free again before the source can move.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from eventmill.backends.base import Checkpoint, CheckpointStorage, ConsumerTransaction
from eventmill.errors import ConflictError, StaleEpochError
from eventmill.events import EventSourceIdentifier, identifier_from_json, source_key

if TYPE_CHECKING:
    from eventmill.backends.postgres.backend import PostgresBackend

CHECKPOINT_COLUMNS = "group_name, source, after_place, version, epoch, updated_at, reset_pending"

FENCES_PER_STATEMENT = 500
"""How many checkpoints ``fence_all`` fences in one statement."""

FENCE_LOCK_TIMEOUT = timedelta(milliseconds=500)
"""How long a fence waits for a checkpoint row locked by another transaction (a
holder frozen inside its batch transaction would otherwise stall it indefinitely)."""


_BOUND = (
    "SELECT set_config('idle_in_transaction_session_timeout', %s, true),"
    " set_config('statement_timeout', %s, true)"
)
"""A transaction's bound (milliseconds, twice), for this transaction only."""


def checkpoint_from_row(row: tuple[Any, ...]) -> Checkpoint:
    """The Checkpoint of a row of ``CHECKPOINT_COLUMNS``."""
    group, source, after, version, epoch, updated_at, reset_pending = row
    return Checkpoint(
        group=group,
        source=identifier_from_json(source),
        after=after,
        version=version,
        epoch=epoch,
        updated_at=updated_at,
        reset_pending=reset_pending,
    )


class PostgresConsumerTransaction(ConsumerTransaction):
    """An open transaction on one pool connection."""

    def __init__(self, storage: PostgresCheckpointStorage, connection: AsyncConnection[Any]):
        self._storage = storage
        self._connection = connection

    @property
    def connection(self) -> AsyncConnection[Any]:
        return self._connection

    async def save_checkpoint(
        self,
        group: str,
        source: EventSourceIdentifier,
        after: int | None,
        *,
        expected_version: int | None,
        epoch: int | None = None,
    ) -> Checkpoint:
        return await self._storage.save_on(
            self._connection, group, source, after, expected_version=expected_version, epoch=epoch
        )


class PostgresCheckpointStorage(CheckpointStorage):
    """Checkpoints of one PostgresBackend."""

    def __init__(self, backend: PostgresBackend) -> None:
        self._backend = backend
        sql = backend.sql
        self._get = sql(
            f"SELECT {CHECKPOINT_COLUMNS} FROM {{schema}}.checkpoints"
            " WHERE group_name = %s AND source_key = %s"
        )
        self._insert = sql(
            "INSERT INTO {schema}.checkpoints"
            " (group_name, source_key, source, after_place, version, epoch)"
            " VALUES (%s, %s, %s, %s, 1, coalesce(%s, 0))"
            f" ON CONFLICT DO NOTHING RETURNING {CHECKPOINT_COLUMNS}"
        )
        self._get_bytes = self._get.as_bytes(None)
        self._insert_bytes = self._insert.as_bytes(None)
        self._update = sql(
            "UPDATE {schema}.checkpoints SET after_place = %s, version = version + 1,"
            " epoch = greatest(epoch, coalesce(%s, epoch)), updated_at = now(),"
            " reset_pending = false"
            " WHERE group_name = %s AND source_key = %s AND version = %s"
            " AND (%s::bigint IS NULL OR epoch <= %s::bigint)"
            " RETURNING version, epoch, updated_at"
        ).as_bytes(None)
        self._fence = sql(
            "INSERT INTO {schema}.checkpoints AS c"
            " (group_name, source_key, source, after_place, version, epoch)"
            " VALUES (%s, %s, %s, NULL, 1, %s)"
            " ON CONFLICT (group_name, source_key) DO UPDATE"
            " SET epoch = excluded.epoch, updated_at = now() WHERE c.epoch < excluded.epoch"
        )
        self._fence_all = sql(
            "INSERT INTO {schema}.checkpoints AS c"
            " (group_name, source_key, source, after_place, version, epoch)"
            " SELECT g, k, s, NULL, 1, e"
            " FROM unnest(%s::text[], %s::text[], %s::jsonb[], %s::bigint[]) AS u (g, k, s, e)"
            " ON CONFLICT (group_name, source_key) DO UPDATE"
            " SET epoch = excluded.epoch, updated_at = now() WHERE c.epoch < excluded.epoch"
        )
        milliseconds = round(FENCE_LOCK_TIMEOUT.total_seconds() * 1000)
        self._fence_lock_timeout = f"SET LOCAL lock_timeout = {milliseconds:d}"
        self._reset = sql(
            "UPDATE {schema}.checkpoints SET after_place = NULL, version = version + 1,"
            " updated_at = now() WHERE group_name = %s AND source_key = %s"
        )
        self._list_all = sql(
            f"SELECT {CHECKPOINT_COLUMNS} FROM {{schema}}.checkpoints"
            " ORDER BY group_name, source_key"
        )
        self._list_group = sql(
            f"SELECT {CHECKPOINT_COLUMNS} FROM {{schema}}.checkpoints"
            " WHERE group_name = %s ORDER BY source_key"
        )
        self._places = sql(
            "SELECT group_name, source_key, after_place FROM {schema}.checkpoints"
            " WHERE group_name = coalesce(%s, group_name)"
        )

    async def get(self, group: str, source: EventSourceIdentifier) -> Checkpoint | None:
        async with self._backend.connection() as connection:
            cursor = await connection.execute(self._get, (group, source_key(source)))
            row = await cursor.fetchone()
        return None if row is None else checkpoint_from_row(row)

    async def save(
        self,
        group: str,
        source: EventSourceIdentifier,
        after: int | None,
        *,
        expected_version: int | None,
        epoch: int | None = None,
    ) -> Checkpoint:
        async with self._backend.connection() as connection:
            return await self.save_on(
                connection, group, source, after, expected_version=expected_version, epoch=epoch
            )

    async def save_on(
        self,
        connection: AsyncConnection[Any],
        group: str,
        source: EventSourceIdentifier,
        after: int | None,
        *,
        expected_version: int | None,
        epoch: int | None,
    ) -> Checkpoint:
        """``save`` on ``connection`` (in its transaction, if one is open)."""
        key = source_key(source)
        if expected_version is None:
            cursor = await connection.execute(
                self._insert_bytes,
                (group, key, Jsonb(source.to_json()), after, epoch),
                prepare=True,
            )
            inserted = await cursor.fetchone()
            if inserted is not None:
                return checkpoint_from_row(inserted)
        else:
            cursor = await connection.execute(
                self._update,
                (after, epoch, group, key, expected_version, epoch, epoch),
                prepare=True,
            )
            updated = await cursor.fetchone()
            if updated is not None:
                version, stored_epoch, updated_at = updated
                return Checkpoint(
                    group=group,
                    source=source,
                    after=after,
                    version=version,
                    epoch=stored_epoch,
                    updated_at=updated_at,
                )
        cursor = await connection.execute(self._get_bytes, (group, key), prepare=True)
        current = await cursor.fetchone()
        found = None if current is None else checkpoint_from_row(current)
        if epoch is not None and found is not None and found.epoch > epoch:
            raise StaleEpochError(
                f"checkpoint of {group!r} for {source}: epoch {epoch} is older than {found.epoch}"
            )
        raise ConflictError(
            f"checkpoint of {group!r} for {source}: expected version {expected_version}, "
            f"found {None if found is None else found.version}"
        )

    async def fence(self, group: str, source: EventSourceIdentifier, epoch: int) -> None:
        """One transaction: ``SET LOCAL lock_timeout``, then the upsert; a row locked
        past FENCE_LOCK_TIMEOUT raises ConflictError (rolled back)."""
        parameters = (group, source_key(source), Jsonb(source.to_json()), epoch)
        async with self._backend.connection() as connection:
            try:
                async with connection.transaction():
                    await connection.execute(self._fence_lock_timeout)
                    await connection.execute(self._fence, parameters)
            except psycopg.errors.LockNotAvailable as error:
                raise ConflictError(
                    f"checkpoint of {group!r} for {source} stayed locked by another"
                    f" transaction for {FENCE_LOCK_TIMEOUT}; not fenced"
                ) from error

    async def fence_all(
        self, fences: Sequence[tuple[str, EventSourceIdentifier, int]]
    ) -> list[tuple[str, EventSourceIdentifier, int]]:
        """Up to FENCES_PER_STATEMENT per statement (rows in key order), each statement
        in a transaction with the fence lock timeout; a statement that meets a locked
        row is rolled back and its fences are tried one by one."""
        ordered = sorted(fences, key=lambda fence: (fence[0], source_key(fence[1])))
        locked: list[tuple[str, EventSourceIdentifier, int]] = []
        for start in range(0, len(ordered), FENCES_PER_STATEMENT):
            chunk = ordered[start : start + FENCES_PER_STATEMENT]
            parameters = (
                [group for group, _, _ in chunk],
                [source_key(source) for _, source, _ in chunk],
                [Jsonb(source.to_json()) for _, source, _ in chunk],
                [epoch for _, _, epoch in chunk],
            )
            async with self._backend.connection() as connection:
                try:
                    async with connection.transaction():
                        await connection.execute(self._fence_lock_timeout)
                        await connection.execute(self._fence_all, parameters)
                    continue
                except psycopg.errors.LockNotAvailable:
                    pass
            locked.extend(await super().fence_all(chunk))
        return locked

    async def reset(self, group: str, source: EventSourceIdentifier) -> None:
        async with self._backend.connection() as connection:
            await connection.execute(self._reset, (group, source_key(source)))

    async def list(self, group: str | None = None) -> list[Checkpoint]:
        async with self._backend.connection() as connection:
            if group is None:
                cursor = await connection.execute(self._list_all)
            else:
                cursor = await connection.execute(self._list_group, (group,))
            rows = await cursor.fetchall()
        return [checkpoint_from_row(row) for row in rows]

    async def places(self, group: str | None = None) -> dict[tuple[str, str], int | None]:
        async with self._backend.connection() as connection:
            cursor = await connection.execute(self._places, (group,))
            rows = await cursor.fetchall()
        return {(group_name, key): after for group_name, key, after in rows}

    @asynccontextmanager
    async def transaction(
        self, *, bound: timedelta | None = None
    ) -> AsyncIterator[PostgresConsumerTransaction]:
        """With ``bound``: ``idle_in_transaction_session_timeout`` and
        ``statement_timeout`` set to it for this transaction only (``SET LOCAL``)."""
        async with self._backend.connection() as connection, connection.transaction():
            if bound is not None:
                milliseconds = str(max(1, round(bound.total_seconds() * 1000)))
                await connection.execute(_BOUND, (milliseconds, milliseconds), prepare=True)
            yield PostgresConsumerTransaction(self, connection)

"""PostgresSubscriberStateStore: who is alive, in ``{schema}.subscribers``.

Every time is the database's ``now()``, and ages are compared in SQL with the freshest
``last_seen`` (or ``now()``, if earlier; see ``SubscriberStateStore``), so nodes whose
clocks disagree still agree on who is alive. ``last_seen`` is not indexed, so a
heartbeat is a HOT update (the table keeps free room in its pages for that); listing
and purging read the whole (small) table anyway. Each method is one statement
(``heartbeat_all`` too, for any number of subscribers).
``heartbeat_all`` runs on connections of its own, outside the pool (at most
``HEARTBEAT_CONNECTIONS`` kept, on the first event loop that heartbeats; other loops
use the pool), so heartbeats never queue behind the node's work for a connection: on a
slow database that queueing alone made live nodes look dead. Requests are stored as a
JSON array; ``list`` decodes each distinct array once, so the
many instances of a group share one requests tuple.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from eventmill.backends.base import (
    SubscriberRecord,
    SubscriberStateStore,
    check_age,
    check_requests,
)
from eventmill.backends.postgres.driver_errors import translate_driver_errors
from eventmill.events import EventSourceIdentifier, check_name, identifier_from_json

if TYPE_CHECKING:
    from eventmill.backends.postgres.backend import PostgresBackend


HEARTBEAT_CONNECTIONS = 2
"""How many connections of their own heartbeats keep (as many as the subscriber manager
has heartbeats in flight)."""

_AGE = "%(age)s::interval"


def live_since(age: str) -> str:
    """SQL for the time ages are measured from, given the SQL of the max age: the
    freshest ``last_seen``, or now if that is earlier, but never more than ``age`` ago."""
    return (
        f"greatest(now() - {age},"
        " least(now(), (SELECT max(last_seen) FROM {schema}.subscribers)))"
    )


_COLUMNS = (
    "group_name, subscriber_id, node_id, subscription_requests::text, registered_at, last_seen"
)
_UPSERT = (
    "INSERT INTO {schema}.subscribers AS s (group_name, subscriber_id, node_id,"
    " subscription_requests, registered_at, last_seen) VALUES (%s, %s, %s, %s, now(), now())"
    " ON CONFLICT (group_name, subscriber_id) DO UPDATE SET node_id = excluded.node_id,"
    " subscription_requests = excluded.subscription_requests, last_seen = excluded.last_seen,"
    " registered_at = {registered_at}"
    f" RETURNING {_COLUMNS}"
)


class PostgresSubscriberStateStore(SubscriberStateStore):
    """Subscriber records of one PostgresBackend."""

    def __init__(self, backend: PostgresBackend) -> None:
        self._backend = backend
        self._heartbeat_loop: asyncio.AbstractEventLoop | None = None
        self._spare: list[AsyncConnection[Any]] = []
        self._closed = False
        sql = backend.sql
        self._register = sql(_UPSERT.replace("{registered_at}", "excluded.registered_at"))
        self._heartbeat = sql(_UPSERT.replace("{registered_at}", "s.registered_at"))
        self._heartbeat_all = sql(
            "INSERT INTO {schema}.subscribers AS s (group_name, subscriber_id, node_id,"
            " subscription_requests, registered_at, last_seen)"
            " SELECT g, i, %s, r, now(), now()"
            " FROM unnest(%s::text[], %s::text[], %s::jsonb[]) WITH ORDINALITY AS u (g, i, r, n)"
            " ORDER BY u.n"
            " ON CONFLICT (group_name, subscriber_id) DO UPDATE SET node_id = excluded.node_id,"
            " subscription_requests = excluded.subscription_requests,"
            " last_seen = excluded.last_seen"
        )
        self._remove = sql(
            "DELETE FROM {schema}.subscribers WHERE group_name = %s AND subscriber_id = %s"
        )
        self._list = sql(
            f"SELECT {_COLUMNS} FROM {{schema}}.subscribers"
            " WHERE (%(group)s::text IS NULL OR group_name = %(group)s)"
            " AND (%(age)s::interval IS NULL"
            f" OR last_seen >= {live_since(_AGE)} - %(age)s::interval)"
            ' ORDER BY group_name COLLATE "C", registered_at, subscriber_id COLLATE "C"'
        )
        self._purge = sql(
            "DELETE FROM {schema}.subscribers"
            f" WHERE last_seen < {live_since(_AGE)} - %(age)s::interval"
        )

    async def register(
        self,
        group: str,
        id: str,
        node_id: str,
        subscription_requests: Sequence[EventSourceIdentifier],
    ) -> SubscriberRecord:
        return await self._upsert(self._register, group, id, node_id, subscription_requests)

    async def heartbeat(
        self,
        group: str,
        id: str,
        node_id: str,
        subscription_requests: Sequence[EventSourceIdentifier],
    ) -> SubscriberRecord:
        return await self._upsert(self._heartbeat, group, id, node_id, subscription_requests)

    async def _upsert(
        self,
        statement: Any,
        group: str,
        id: str,
        node_id: str,
        subscription_requests: Sequence[EventSourceIdentifier],
    ) -> SubscriberRecord:
        check_name(group, "group")
        check_name(id, "subscriber id")
        check_name(node_id, "node id")
        requests = check_requests(subscription_requests)
        document = Jsonb([source.to_json() for source in requests])
        async with self._backend.connection() as connection:
            cursor = await connection.execute(statement, (group, id, node_id, document))
            row = await cursor.fetchone()
        assert row is not None  # an upsert always returns its row
        return _record(row, requests)

    async def heartbeat_all(
        self,
        node_id: str,
        subscribers: Sequence[tuple[str, str, Sequence[EventSourceIdentifier]]],
    ) -> None:
        """One statement for every subscriber (the last entry of a repeated key wins),
        writing the records in (group, id) order, as a takeover locks them (see
        ``PostgresSubscriptionStateStore``), so the two never deadlock."""
        check_name(node_id, "node id")
        entries: dict[tuple[str, str], Jsonb] = {}
        for group, id, requests in subscribers:
            check_name(group, "group")
            check_name(id, "subscriber id")
            documents = [source.to_json() for source in check_requests(requests)]
            entries[group, id] = Jsonb(documents)
        if not entries:
            return
        order = sorted(entries)
        arguments = (
            node_id,
            [group for group, _ in order],
            [id for _, id in order],
            [entries[key] for key in order],
        )
        loop = asyncio.get_running_loop()
        if self._heartbeat_loop is None:
            self._heartbeat_loop = loop
        if loop is not self._heartbeat_loop or self._closed:
            async with self._backend.connection() as connection:
                await connection.execute(self._heartbeat_all, arguments)
            return
        with translate_driver_errors(self._backend.schema):
            connection = (
                self._spare.pop() if self._spare else await self._backend.dedicated_connection()
            )
            try:
                await connection.execute(self._heartbeat_all, arguments)
            except BaseException:
                await connection.close()
                raise
        if self._closed or len(self._spare) >= HEARTBEAT_CONNECTIONS:
            await connection.close()
        else:
            self._spare.append(connection)

    async def close(self) -> None:
        """Close the heartbeat connections; later heartbeats use the pool. Idempotent."""
        self._closed = True
        spare, self._spare = self._spare, []
        for connection in spare:
            await connection.close()

    async def remove(self, group: str, id: str) -> None:
        async with self._backend.connection() as connection:
            await connection.execute(self._remove, (group, id))

    async def list(
        self, *, group: str | None = None, max_age: timedelta | None = None
    ) -> list[SubscriberRecord]:
        if max_age is not None:
            check_age(max_age, "max_age")
        async with self._backend.connection() as connection:
            cursor = await connection.execute(self._list, {"group": group, "age": max_age})
            rows = await cursor.fetchall()
        decoded: dict[str, tuple[EventSourceIdentifier, ...]] = {}
        records = []
        for row in rows:
            requests = decoded.get(row[3])
            if requests is None:
                requests = decoded[row[3]] = tuple(
                    identifier_from_json(item) for item in json.loads(row[3])
                )
            records.append(_record(row, requests))
        return records

    async def purge(self, max_age: timedelta) -> int:
        check_age(max_age, "max_age")
        async with self._backend.connection() as connection:
            cursor = await connection.execute(self._purge, {"age": max_age})
            return cursor.rowcount


def _record(row: tuple[Any, ...], requests: tuple[EventSourceIdentifier, ...]) -> SubscriberRecord:
    group, id, node_id, _, registered_at, last_seen = row
    return SubscriberRecord(
        group=group,
        id=id,
        node_id=node_id,
        subscription_requests=requests,
        registered_at=registered_at,
        last_seen=last_seen,
    )

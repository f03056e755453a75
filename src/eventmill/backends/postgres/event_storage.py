"""PostgresEventStorage: events in PostgreSQL, with no skipped events.

Writing. ``publish`` is one call of the ``{schema}.publish`` SQL function, sent as one
autocommit statement (one round trip, its own transaction). Inside, in this order:

1. it refuses to run if its transaction already has a transaction id (xid): publishing
   must be the first write of its transaction;
2. under a session-level advisory lock held only for this step, it takes its xid
   (``pg_current_xact_id()``) and its block of sequence numbers, then unlocks. So, for
   every pair of publishers, xid order equals sequence-number order, and no lock
   shared by all writers is held through commit;
3. it locks the stream's row in ``{schema}.streams`` (held to commit: only writers of
   the same stream wait for each other), checks the write condition against the
   stream's last position, and raises SQLSTATE EM001 when it does not hold;
4. it inserts the events stamped with the xid and returns what Python needs to build
   the ``StoredEvent``s (first sequence number and position, time, ids).

Wake-ups. The category is announced with NOTIFY on the channel ``<schema>_events`` in
the publish's round trip, as a statement of its own after it: the publish, a Sync (which
commits it: each Sync ends an implicit transaction), the NOTIFY and a second Sync are
pipelined on the publishing connection. So the notification leaves the server right
after the commit, and no round trip, task or connection is spent on it apart. It is not
inside the publishing transaction: a NOTIFY there would hold PostgreSQL's notification
lock through that transaction's commit (its WAL flush) and make concurrent publishers
commit one at a time; a NOTIFY alone writes no WAL, so its commit does not wait for a
flush. A lost announcement costs latency only: readers poll as well.

Reading. A log or category read is one statement, a call of ``{schema}.read_log`` or
``{schema}.read_category`` (migration 0013): each first takes the visibility watermark
({schema}.read_watermark(): the oldest transaction id among publishers in flight, or
the snapshot's xmax when none is), then reads the page in a statement of its own,
which, the function being volatile, takes a newer snapshot under READ COMMITTED. A
partition read is two statements pipelined (one round trip), the watermark then the
read, because its query's shape varies with the partition count. The watermark never
reads the lock table: only the transactions running at its snapshot are looked at,
each by a try-lock of the key of the marker a publisher holds until it ends, so its
cost does not grow with the locks other sessions hold, and with no transaction running
it touches no lock at all (migration 0011 says why it is exact, prepared (2PC)
publishers included). Under READ COMMITTED the read's snapshot is taken after the
watermark's lock scan, so it sees every publisher that had ended by then. The reads run
under READ COMMITTED whatever the server's, database's, role's or DSN's default: the
watermark refuses any other level (EM004) and the reader then sets its session's
default to READ COMMITTED and reads again (``connect`` sets it on every new
connection). Through a transaction-pooled pool (``connect(..., direct_dsn=...)``) a read
is one explicit READ COMMITTED transaction instead (BEGIN, SET TRANSACTION, the read's
statements, COMMIT, pipelined: still one round trip), which needs no session setting.
An event below the watermark has finished publishing, and so has
every publisher with a lower sequence number (its xid is lower still), so each read
returns a gap-free prefix of what will ever commit: a reader resuming after sequence
number N never misses a later commit below N.

A read returns the events in order up to, not including, the first one at or above
the watermark (it stops there rather than filtering it out): a row whose transaction
id comes from another cluster (a table restored or replicated from elsewhere) then
holds readers back instead of being skipped, until ``eventmill migrate`` restamps it.
Stream reads need no watermark: positions are taken under the stream's row lock, held
until commit, so a stream's events commit in order (on a standby too: commits replay
in order). Log and category reads on a server in recovery are refused (StorageError):
its lock table does not show the primary's publishers.

Cost: a reader does not see an event until every publisher that took its xid earlier
has ended. Other transactions (consumers' checkpoint transactions, your own work in
the same database) never delay delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import random
import weakref
from collections.abc import AsyncGenerator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import pq
from psycopg.rows import RowMaker

from eventmill.backends.base import (
    EventStorage,
    LagPlace,
    PublisherInFlight,
    ReadHoldback,
    SourceLag,
)
from eventmill.backends.postgres.driver_errors import (
    NOT_READ_COMMITTED,
    READ_ON_STANDBY,
    UNMET_WRITE_CONDITION,
)
from eventmill.backends.postgres.lags import count_lags
from eventmill.backends.postgres.notifications import channel_name
from eventmill.conditions import WriteCondition
from eventmill.errors import UnmetWriteConditionError
from eventmill.events import (
    PARTITION_BUCKETS,
    CategoryIdentifier,
    CategoryPartitionIdentifier,
    EventSourceIdentifier,
    LogIdentifier,
    NewEvent,
    StoredEvent,
    StreamIdentifier,
    stored_event,
    stream_hash,
)

if TYPE_CHECKING:
    from psycopg import AsyncCursor

    from eventmill.backends.postgres.backend import PostgresBackend

_COLUMNS = (
    "id::text, name, category, stream, position, sequence_number, payload::text,"
    " metadata::text, (occurred_at AT TIME ZONE 'UTC')::text || 'Z',"
    " (observed_at AT TIME ZONE 'UTC')::text || 'Z'"
)
"""A read's columns, in the order of ``events.stored_event``'s parameters, all loaded by
psycopg as text or int (its C loaders) and decoded by ``_event_from_row``. The times
are UTC written in ISO form whatever the session's time zone."""
_PAGE_COLUMNS = (
    "id, name, category, stream, position, sequence_number, payload, metadata,"
    " occurred_at, observed_at, transaction_id"
)
_WATERMARK = "current_setting('eventmill.watermark')::xid8"
_VISIBLE = f"transaction_id < {_WATERMARK}"
_SET_WATERMARK = (
    "SELECT set_config('eventmill.watermark', {schema}.read_watermark()::text, false),"
    " set_config('enable_bitmapscan', 'off', true), set_config('enable_seqscan', 'off', true)"
)
"""The watermark for the next statement, which runs in the same (implicit) transaction
and so also plans with these two settings: a page is an ordered index scan that stops
after ``limit`` rows. Otherwise, whenever the planner's estimate of the rows after
``after`` is low (a table not analyzed since it grew, a stall with many events beyond
the watermark), it reads every row after ``after`` with a bitmap scan and sorts them
for each page: a 100,000-event category read then cost time quadratic in its length."""
_READ_COMMITTED = "SET default_transaction_isolation = 'read committed'"
_READ_COMMITTED_TRANSACTION = "SET TRANSACTION ISOLATION LEVEL READ COMMITTED"
# Serialization failures of a publish (possible under REPEATABLE READ or SERIALIZABLE
# defaults), which is its own transaction, are retried this many times, after a random
# wait of up to 1 ms doubled per retry (at most 64 ms): a conflicting transaction still
# open (a slow or prepared one) failed immediate retries in a row.
_SERIALIZATION_RETRIES = 20
_SERIALIZATION_WAIT = 0.001


def _up_to_watermark(page: str) -> str:
    """A read returning the rows of ``page`` (a query of _PAGE_COLUMNS in sequence order)
    that lie before its first row at or above the watermark: a running "every row so
    far is below" over the page, which is already in order (no sort); the watermark is
    read once (an InitPlan), not per row."""
    return (
        f"SELECT {_COLUMNS} FROM (SELECT *, bool_and(transaction_id < (SELECT {_WATERMARK}))"
        " OVER (ORDER BY sequence_number) AS below"
        f" FROM ({page}) AS page) AS checked WHERE below ORDER BY sequence_number"
    )


_PUBLISHERS_IN_FLIGHT = (
    "SELECT marker.objid::bigint, marker.pid, prepared.gid,"
    " coalesce(prepared.prepared, activity.xact_start) AS since,"
    " activity.application_name, activity.state"
    " FROM pg_locks AS marker"
    " LEFT JOIN pg_prepared_xacts AS prepared"
    " ON prepared.transaction::text::bigint = marker.objid::bigint"
    " LEFT JOIN pg_stat_activity AS activity ON activity.pid = marker.pid"
    " WHERE marker.locktype = 'advisory' AND marker.granted AND marker.objsubid = 1"
    " AND marker.classid = '{schema}.event_sequence_numbers'::regclass::oid"
    " ORDER BY since NULLS FIRST"
)
_HOLDBACK = (
    # the watermark, then the committed events at or above it: the last event below
    # it is found by a backward scan through them, the rest counted after it
    "SELECT w.watermark::text::bigint, now(), (SELECT count(*) FROM {schema}.events"
    " WHERE sequence_number > coalesce((SELECT sequence_number FROM {schema}.events"
    " WHERE transaction_id < w.watermark ORDER BY sequence_number DESC LIMIT 1), 0))"
    " FROM (SELECT {schema}.read_watermark() AS watermark) AS w"
)


_PUBLISH = "SELECT * FROM {schema}.publish(%s, %s, %s, %s::bigint[], %s::jsonb)"
_ANNOUNCE = "SELECT pg_notify(%s, %s)"
_PUBLISH_PREPARED = "SELECT * FROM {schema}.publish($1, $2, $3, $4::bigint[], $5::jsonb)"
_ANNOUNCE_PREPARED = b"SELECT pg_notify($1, $2)"
_ANNOUNCE_NAME = b"eventmill_announce"
"""The publish and its NOTIFY as libpq sends them (see ``_publish_and_announce``),
prepared under these names (the publish's carries a digest of its text: one connection
may serve backends of several schemas)."""
_prepared: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], set[bytes]] = (
    weakref.WeakKeyDictionary()
)
"""The names of the statements ``_publish_and_announce`` prepared on each connection
(names are digests of the text, so every storage of a schema shares them)."""
_POSTGRES_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_FATAL_ERROR = pq.ExecStatus.FATAL_ERROR
_PIPELINE_SYNC = pq.ExecStatus.PIPELINE_SYNC
_BINARY = pq.Format.BINARY
_DUPLICATE_STATEMENT = "42P05"

_encode_fast = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_encode_text = json.JSONEncoder(ensure_ascii=False).encode


def _encode_json(value: object) -> str:
    """JSON for jsonb that keeps floats floats.

    jsonb keeps a number's written scale: ``1e+16`` (how Python writes floats of 1e16
    and more) would be stored with scale 0 and read back as an int. Such floats are
    written with a ``.0`` instead. The fast encoder's output shows them as ``e+``; only
    then (or when a string happens to contain ``e+``) is the slower walk taken.
    """
    text = _encode_fast(value)
    return _encode_keeping_floats(value) if "e+" in text else text


def _encode_keeping_floats(value: object) -> str:
    if type(value) is float:
        text = repr(value)
        return format(value, ".1f") if "e+" in text else text
    if type(value) is dict:
        return (
            "{"
            + ",".join(f"{_encode_text(k)}:{_encode_keeping_floats(v)}" for k, v in value.items())
            + "}"
        )
    if type(value) is list:
        return "[" + ",".join(_encode_keeping_floats(item) for item in value) + "]"
    return _encode_text(value)


_LAST_SEQUENCE_NUMBER = 2**63 - 1
# The watermark and the page in one statement (migration 0013; see the module docstring).
_READ_LOG = "SELECT * FROM {schema}.read_log(%s, %s)"
_READ_CATEGORY = "SELECT * FROM {schema}.read_category(%s, %s, %s)"
_READ_STREAM = (
    f"SELECT {_COLUMNS} FROM {{schema}}.events WHERE category = %s AND stream = %s"
    " AND position > %s ORDER BY position LIMIT %s"
)
_LATEST_LOG = (
    f"SELECT {_COLUMNS} FROM {{schema}}.events WHERE {_VISIBLE}"
    " ORDER BY sequence_number DESC LIMIT 1"
)
_LATEST_CATEGORY = (
    f"SELECT {_COLUMNS} FROM {{schema}}.events WHERE category = %s AND {_VISIBLE}"
    " ORDER BY sequence_number DESC LIMIT 1"
)
_LATEST_STREAM = (
    f"SELECT {_COLUMNS} FROM {{schema}}.events WHERE category = %s AND stream = %s"
    " ORDER BY position DESC LIMIT 1"
)


def _partition_query(partitions: int, *, latest: bool) -> str:
    """The read (or, with ``latest``, the latest-event) query of a partition of
    ``partitions``: a merge of the ordered scans of its buckets. Parameters: category,
    b0, b1, ... (the buckets) and, for reads, after and limit."""
    if latest:
        after, direction, limit = f" AND {_VISIBLE}", "DESC", "1"
        columns = _COLUMNS
    else:
        after, direction, limit = " AND sequence_number > %(after)s", "", "%(limit)s"
        columns = _PAGE_COLUMNS
    scans = [
        f"(SELECT {columns} FROM {{schema}}.events WHERE category = %(category)s"
        f" AND stream_hash %% {PARTITION_BUCKETS} = %(b{number})s{after}"
        f" ORDER BY sequence_number {direction} LIMIT {limit})"
        for number in range(PARTITION_BUCKETS // partitions)
    ]
    merged = (
        f"SELECT * FROM ({' UNION ALL '.join(scans)}) AS partition_events"
        f" ORDER BY sequence_number {direction} LIMIT {limit}"
    )
    return merged if latest else _up_to_watermark(merged)


def _partition_parameters(source: CategoryPartitionIdentifier) -> dict[str, object]:
    parameters: dict[str, object] = {"category": source.category}
    for number, bucket in enumerate(source.buckets):
        parameters[f"b{number}"] = bucket
    return parameters


_scan_json: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_from_iso = datetime.fromisoformat


def _event_from_row(row: Sequence[Any]) -> StoredEvent:
    """A StoredEvent from a row of _COLUMNS (JSON and times still text). Raises
    ValueError for a time not in ISO form (a session DateStyle other than ISO, which
    psycopg refused as well).

    Decoding here rather than in psycopg's Python-level loaders saves a call per value
    and the conversion to the session's time zone (a ``ZoneInfo``): reads spent 3.4 us
    an event in psycopg and the row function, now about 2. JSON goes straight to the
    scanner that ``json.loads`` ends in (PostgreSQL writes jsonb as bare UTF-8 JSON, so
    no encoding detection or whitespace matching is needed), and the empty object, what
    most metadata is, is not parsed at all. Times come back in UTC (``datetime.UTC``),
    as the in-memory backend gives them.
    """
    id, name, category, stream, position, number, payload, metadata, occurred, observed = row
    return stored_event(
        id,
        name,
        category,
        stream,
        position,
        number,
        {} if payload == "{}" else _scan_json(payload, 0)[0],
        {} if metadata == "{}" else _scan_json(metadata, 0)[0],
        _from_iso(occurred),
        _from_iso(observed),
    )


def _stored_event_rows(cursor: AsyncCursor[Any]) -> RowMaker[StoredEvent]:
    return _event_from_row


def _int8(value: bytes | None) -> int:
    """A binary bigint (or timestamptz: microseconds since 2000) of a result."""
    assert value is not None
    return int.from_bytes(value, signed=True)


def _sqlstate(result: pq.abc.PGresult) -> str:
    return (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()


async def _pipeline_results(pgconn: pq.abc.PGconn, segments: int) -> list[list[pq.abc.PGresult]]:
    """Send what is queued on ``pgconn`` (in pipeline mode, non-blocking) and return the
    results of its next ``segments`` Sync-ended segments, each a list (the Syncs' own
    results left out). Blocks until they are in; raises psycopg.OperationalError when
    the connection fails."""
    loop = asyncio.get_running_loop()
    socket = pgconn.socket
    # Waiting to write, not to read: the answers due meanwhile (ParseComplete) are a
    # few bytes, far from filling the socket's buffer and stalling the server.
    while pgconn.flush():
        await _ready(loop.add_writer, loop.remove_writer, socket)
    found: list[list[pq.abc.PGresult]] = [[]]
    while True:
        if pgconn.is_busy():
            await _ready(loop.add_reader, loop.remove_reader, socket)
            pgconn.consume_input()
            continue
        result = pgconn.get_result()
        if result is None:  # the end of one statement's results
            continue
        if result.status != _PIPELINE_SYNC:
            found[-1].append(result)
        elif len(found) == segments:
            return found
        else:
            found.append([])


async def _ready(
    add: Callable[[int, Callable[[asyncio.Future[None]], None], asyncio.Future[None]], object],
    remove: Callable[[int], object],
    socket: int,
) -> None:
    """Wait until ``socket`` is ready, as ``add`` (the loop's add_reader or add_writer)
    watches it."""
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    add(socket, _settle, ready)
    try:
        await ready
    finally:
        remove(socket)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Watermark(enum.Enum):
    """How a read's statement stands to the visibility watermark."""

    NONE = enum.auto()
    """Needs none (stream reads)."""
    TAKEN_BY_QUERY = enum.auto()
    """Takes it itself (the read functions of migration 0013)."""
    SET_BEFORE = enum.auto()
    """Reads it from ``eventmill.watermark``, set by ``_SET_WATERMARK`` just before."""


class PostgresEventStorage(EventStorage):
    """Event storage in the backend's schema; see the module docstring for ordering."""

    def __init__(self, backend: PostgresBackend) -> None:
        self._backend = backend
        # The statements of publishes and reads as bytes, made once: psycopg turns a
        # composed query into bytes at every execution (4 us a statement here).
        self._publish = self._statement(_PUBLISH)
        self._publish_prepared = self._statement(_PUBLISH_PREPARED)
        digest = hashlib.sha256(self._publish_prepared).hexdigest()[:32]
        self._publish_name = f"eventmill_publish_{digest}".encode()
        self._read_log = self._statement(_READ_LOG)
        self._read_category = self._statement(_READ_CATEGORY)
        self._read_stream = self._statement(_READ_STREAM)
        self._latest_log = self._statement(_LATEST_LOG)
        self._latest_category = self._statement(_LATEST_CATEGORY)
        self._partition_queries: dict[tuple[int, bool], bytes] = {}
        self._set_watermark = self._statement(_SET_WATERMARK)
        self._latest_stream = self._statement(_LATEST_STREAM)
        self._channel = channel_name(backend.schema)

    async def publish(
        self,
        stream: StreamIdentifier,
        events: Sequence[NewEvent],
        condition: WriteCondition | None,
    ) -> list[StoredEvent]:
        """Append in one round trip. Raises UnmetWriteConditionError, StorageError."""
        allowed = (
            None
            if condition is None
            else "{" + ",".join(["-1" if p is None else str(p) for p in condition.allowed]) + "}"
        )
        batch = _encode_json(
            [[e.name, e.payload, e.metadata, e.occurred_at.isoformat()] for e in events]
        )
        parameters = (stream.category, stream.stream, stream_hash(stream.stream), allowed, batch)
        for attempt in range(_SERIALIZATION_RETRIES + 1):
            if attempt:  # after a random wait, on a connection not held meanwhile
                wait = _SERIALIZATION_WAIT * 2 ** min(attempt - 1, 6)
                await asyncio.sleep(random.uniform(0, wait))
            async with self._backend.connection() as connection:
                try:
                    row = await self._publish_and_announce(connection, parameters, stream.category)
                except (
                    psycopg.errors.SerializationFailure,
                    psycopg.errors.InvalidSqlStatementName,
                    psycopg.errors.DuplicatePreparedStatement,
                ):
                    # Its own transaction, or not run at all (the connection's prepared
                    # statements were not as recorded: now they are), so nothing was
                    # written: safe to run again.
                    if attempt == _SERIALIZATION_RETRIES:
                        raise
                    continue
                except psycopg.Error as error:
                    if error.sqlstate == UNMET_WRITE_CONDITION:
                        found = int(error.diag.message_detail or "-1")
                        raise UnmetWriteConditionError(
                            condition, None if found < 0 else found
                        ) from error
                    raise
            break
        first_sequence_number, first_position, observed_at, event_ids = row
        ids = event_ids.split(",")
        category = stream.category
        name_of_stream = stream.stream
        return [
            stored_event(
                ids[offset],
                event.name,
                category,
                name_of_stream,
                first_position + offset,
                first_sequence_number + offset,
                event.payload,
                event.metadata,
                event.occurred_at,
                observed_at,
            )
            for offset, event in enumerate(events)
        ]

    async def _publish_and_announce(
        self,
        connection: psycopg.AsyncConnection[Any],
        parameters: tuple[object, ...],
        category: str,
    ) -> tuple[int, int, datetime, str]:
        """Send the publish, a Sync, the NOTIFY of ``category`` and a Sync in one go, then
        wait for their answers (see the module docstring); return the publish's row (first
        sequence number and position, time in UTC, ids joined by commas). Raises
        psycopg.Error: the publish's, its commit's or the NOTIFY's (a NOTIFY that fails
        after a commit looks to the caller like a commit whose answer was lost, but for a
        NOTIFY statement found deallocated: that announcement is lost, readers poll).

        This drives libpq's pipeline mode itself (``connection.pgconn``) instead of
        psycopg's ``Pipeline``, whose bookkeeping in Python cost 0.1 ms of client CPU a
        publish here, a third of all of it (0.25 ms against 0.10 for this round trip): on
        two cores shared with the server that bounded 8 concurrent writers. Both
        statements are prepared on the connection by name (their Parse rides along in the
        first publish's round trip; ``_prepared`` records them), parameters go as text
        and the row comes back binary (integers, and a time that needs no parsing and
        no session time zone). A commit that fails at its Sync (a serialization failure
        under SERIALIZABLE) is an error result before that Sync, which libpq reports in
        order. A publish refused (write condition) still announces its category: a
        spurious wake-up costs each node one read, less than a round trip on every
        publish would. A connection left with answers unread (cancelled, or failed
        halfway) is closed, never given back.
        """
        if self._backend.transaction_pooled:
            # PgBouncer in transaction mode: no pipeline spanning transactions (one hung
            # there), so the NOTIFY follows in a round trip of its own.
            cursor = await connection.execute(self._publish, parameters, prepare=True)
            found = await cursor.fetchone()
            await connection.execute(_ANNOUNCE, (self._channel, category), prepare=True)
            assert found is not None
            return found[0], found[1], found[2].astimezone(UTC), found[3]
        encoding = connection.info.encoding
        names = _prepared.get(connection)
        if names is None:
            names = _prepared[connection] = set()
        preparing = [
            (name, text)
            for name, text in (
                (self._publish_name, self._publish_prepared),
                (_ANNOUNCE_NAME, _ANNOUNCE_PREPARED),
            )
            if name not in names
        ]
        pgconn = connection.pgconn
        finished = False
        pgconn.enter_pipeline_mode()
        try:
            for name, text in preparing:
                pgconn.send_prepare(name, text)
            pgconn.send_query_prepared(
                self._publish_name,
                [None if value is None else str(value).encode(encoding) for value in parameters],
                result_format=_BINARY,
            )
            pgconn.pipeline_sync()  # commits the publish: the NOTIFY is a transaction apart
            pgconn.send_query_prepared(
                _ANNOUNCE_NAME, [self._channel.encode(encoding), category.encode(encoding)]
            )
            pgconn.pipeline_sync()
            published, announced = await _pipeline_results(pgconn, 2)
            pgconn.exit_pipeline_mode()
            finished = True
        finally:
            if not finished:
                await connection.close()
        for (name, _), result in zip(preparing, published, strict=False):
            if result.status != _FATAL_ERROR or _sqlstate(result) == _DUPLICATE_STATEMENT:
                names.add(name)
        for result in published:
            if result.status == _FATAL_ERROR:
                error = psycopg.errors.error_from_result(result, encoding)
                if isinstance(error, psycopg.errors.InvalidSqlStatementName):
                    names.clear()  # deallocated (DISCARD ALL, DEALLOCATE ALL): prepare again
                raise error
        for result in announced:
            if result.status == _FATAL_ERROR:
                error = psycopg.errors.error_from_result(result, encoding)
                if not isinstance(error, psycopg.errors.InvalidSqlStatementName):
                    raise error
                names.clear()
        row = published[-1]
        return (
            _int8(row.get_value(0, 0)),
            _int8(row.get_value(0, 1)),
            _POSTGRES_EPOCH + timedelta(microseconds=_int8(row.get_value(0, 2))),
            bytes(row.get_value(0, 3) or b"").decode(encoding),
        )

    async def read(
        self, source: EventSourceIdentifier, *, after: int | None, limit: int
    ) -> list[StoredEvent]:
        """Up to ``limit`` committed events after ``after``, in order. Raises StorageError."""
        return await self._fetch(*self._read_statement(source, after, limit))

    async def pages(
        self,
        source: EventSourceIdentifier,
        *,
        after: int | None,
        limit: int,
        batch: int | None = None,
    ) -> AsyncGenerator[list[StoredEvent], None]:
        """Pages of ``read``, each read from the end of the one before, until a short one;
        the next page is read while this one is decoded and handed out; with ``batch``,
        each page's rows are decoded ``batch`` at a time, as the caller asks for them.
        Raises StorageError.

        As soon as a full page's rows have arrived, the read of the next one is sent
        (its ``after`` is the last row's place, taken from the raw result), and only then
        are the rows turned into events: the server reads the next page while this
        process decodes and the caller handles this one. Each page is still one read as
        ``read`` makes it (its own watermark, gap-free from where the page before ended),
        so nothing is skipped or repeated. At most one read is ahead, on a pooled
        connection it holds only for its round trip. When the iteration ends early (the
        generator closed, or garbage collected), the read ahead is awaited first, so its
        connection goes back to the pool idle; when the caller is cancelled while waiting
        for a page, that read is cancelled as any read is (psycopg cancels the query
        before the connection is given back).

        Decoding a page of 500 takes about 1 ms here; a consumer that saves a checkpoint
        every 100 events waits for each commit (0.3-0.5 ms) while the next 100 are
        processed. Decoded in one block, a page delayed the commit in flight by the
        rest of that millisecond, once a page; decoded as asked for, ``batch`` rows at
        a time, each batch's decoding fits inside the wait for one commit.
        """
        column = 4 if isinstance(source, StreamIdentifier) else 5  # position, sequence_number
        cursor = await self._execute(*self._read_statement(source, after, limit))
        ahead: asyncio.Future[AsyncCursor[StoredEvent]] | None = None
        try:
            while True:
                result = cursor.pgresult
                if result is not None and result.ntuples == limit:
                    place = result.get_value(limit - 1, column)
                    assert place is not None  # a NOT NULL column, in text format
                    statement = self._read_statement(source, int(place), limit)
                    ahead = asyncio.ensure_future(self._execute(*statement))
                    await asyncio.sleep(0)  # lets it send its query before the rows are decoded
                rows = 0 if result is None else result.ntuples
                if batch is None or rows <= batch:
                    yield await cursor.fetchall()
                else:
                    for _ in range(0, rows, batch):
                        yield await cursor.fetchmany(batch)
                if ahead is None:
                    return
                cursor = await ahead
                ahead = None
        finally:
            if ahead is not None:
                with contextlib.suppress(Exception):  # a page nobody will take
                    await ahead

    def _read_statement(
        self, source: EventSourceIdentifier, after: int | None, limit: int
    ) -> tuple[bytes, tuple[object, ...] | dict[str, object], _Watermark]:
        """The query, parameters and watermark (as ``_execute`` takes them) of a read."""
        if isinstance(source, StreamIdentifier):
            stream = (source.category, source.stream, -1 if after is None else after, limit)
            return self._read_stream, stream, _Watermark.NONE
        # Past the last bigint nothing is stored; a larger int would reach the read
        # functions as numeric, for which they have no signature.
        start = 0 if after is None else min(after, _LAST_SEQUENCE_NUMBER)
        if isinstance(source, LogIdentifier):
            return self._read_log, (start, limit), _Watermark.TAKEN_BY_QUERY
        if isinstance(source, CategoryIdentifier) or source.partitions == 1:
            return self._read_category, (source.category, start, limit), _Watermark.TAKEN_BY_QUERY
        query = self._partition_query(source.partitions, latest=False)
        parameters = {**_partition_parameters(source), "after": start, "limit": limit}
        return query, parameters, _Watermark.SET_BEFORE

    async def publishers_in_flight(self) -> list[PublisherInFlight]:
        """The publishes in flight now, oldest first: what holds log and category readers
        back (an orphaned prepared publish shows here with its gid). Raises
        StorageError."""
        async with self._backend.connection() as connection:
            cursor = await connection.execute(self._backend.sql(_PUBLISHERS_IN_FLIGHT))
            rows = await cursor.fetchall()
        return [PublisherInFlight(*row) for row in rows]

    async def read_holdback(self) -> ReadHoldback | None:
        """Two statements: the publishers in flight, then the watermark and the
        committed events at or above it (counted from the last event below it
        backwards: costs what readers wait for). None on a server in recovery (log
        and category reads are refused there). Raises StorageError."""
        publishers = await self.publishers_in_flight()
        holdback = self._backend.sql(_HOLDBACK)
        async with self._backend.connection() as connection:
            try:
                if self._backend.transaction_pooled:  # as in _fetch
                    async with connection.transaction():
                        await connection.execute(_READ_COMMITTED_TRANSACTION)
                        cursor = await connection.execute(holdback)
                else:
                    cursor = await connection.execute(holdback)
            except psycopg.Error as error:
                if error.sqlstate == READ_ON_STANDBY:
                    return None
                if error.sqlstate != NOT_READ_COMMITTED:
                    raise
                await connection.execute(_READ_COMMITTED)
                cursor = await connection.execute(holdback)
            row = await cursor.fetchone()
        assert row is not None
        watermark, checked_at, beyond = row
        oldest = publishers[0] if publishers else None
        return ReadHoldback(
            watermark=watermark, oldest=oldest, events_beyond=beyond, checked_at=checked_at
        )

    async def lags(self, places: Sequence[LagPlace]) -> list[SourceLag]:
        """Counted in one statement without reading the events (``lags.count_lags``)."""
        return await count_lags(self._backend, places)

    async def latest(self, source: EventSourceIdentifier) -> StoredEvent | None:
        """The last event a read could return now, or None. Raises StorageError.

        It filters (newest row below the watermark) instead of stopping as reads do:
        exact on tables this cluster wrote (xid order is sequence order), not on a
        table copied from another cluster until ``repair_copied_events`` has run
        (docs/postgres.md)."""
        parameters: tuple[object, ...]
        if isinstance(source, LogIdentifier):
            query, parameters = self._latest_log, ()
        elif isinstance(source, CategoryIdentifier):
            query, parameters = self._latest_category, (source.category,)
        elif isinstance(source, CategoryPartitionIdentifier):
            if source.partitions == 1:
                query, parameters = self._latest_category, (source.category,)
            else:
                query = self._partition_query(source.partitions, latest=True)
                found = await self._fetch(query, _partition_parameters(source))
                return found[0] if found else None
        else:
            stream = (source.category, source.stream)
            found = await self._fetch(self._latest_stream, stream, _Watermark.NONE)
            return found[0] if found else None
        found = await self._fetch(query, parameters)
        return found[0] if found else None

    def _statement(self, text: str) -> bytes:
        """``text`` for this backend's schema, as the bytes psycopg sends (the schema's
        name is ASCII: ``check_schema_name``)."""
        return self._backend.sql(text).as_bytes(None)

    def _partition_query(self, partitions: int, *, latest: bool) -> bytes:
        key = (partitions, latest)
        query = self._partition_queries.get(key)
        if query is None:
            query = self._partition_queries[key] = self._statement(
                _partition_query(partitions, latest=latest)
            )
        return query

    async def _fetch(
        self,
        query: bytes,
        parameters: tuple[object, ...] | dict[str, object],
        watermark: _Watermark = _Watermark.SET_BEFORE,
    ) -> list[StoredEvent]:
        """Run a read (``_execute``) and return its events. Raises StorageError."""
        cursor = await self._execute(query, parameters, watermark)
        return await cursor.fetchall()

    async def _execute(
        self,
        query: bytes,
        parameters: tuple[object, ...] | dict[str, object],
        watermark: _Watermark,
    ) -> AsyncCursor[StoredEvent]:
        """Run a read, with its watermark as ``watermark`` says (SET_BEFORE: a statement
        before it, same trip). A log, category or partition read on a connection whose
        session is not READ COMMITTED sets it and runs again; through a
        transaction-pooled pool such a read is one explicit READ COMMITTED transaction
        instead. Raises StorageError (translated by the caller's context).

        Returns the cursor holding the rows, with the connection already given back:
        its ``fetchall`` then only decodes what is in memory (no I/O), so the connection
        is not held while the rows become events.
        """
        async with self._backend.connection() as connection:
            cursor = connection.cursor(row_factory=_stored_event_rows)
            if watermark is _Watermark.NONE:
                await cursor.execute(query, parameters, prepare=True)
                return cursor
            setup = self._set_watermark if watermark is _Watermark.SET_BEFORE else None
            if self._backend.transaction_pooled:
                # No session setting would follow the next transaction to its server
                # session: READ COMMITTED is set on the transaction itself.
                async with connection.pipeline(), connection.transaction():
                    await connection.execute(_READ_COMMITTED_TRANSACTION)
                    if setup is not None:
                        await connection.execute(setup, prepare=True)
                    await cursor.execute(query, parameters, prepare=True)
                return cursor
            try:
                await _run_read(connection, cursor, setup, query, parameters)
            except psycopg.Error as error:
                if error.sqlstate != NOT_READ_COMMITTED:
                    raise
                await connection.execute(_READ_COMMITTED)
                await _run_read(connection, cursor, setup, query, parameters)
            return cursor


async def _run_read(
    connection: psycopg.AsyncConnection[Any],
    cursor: AsyncCursor[StoredEvent],
    setup: bytes | None,
    query: bytes,
    parameters: tuple[object, ...] | dict[str, object],
) -> None:
    """The read alone (one statement, no pipeline: a pipeline cost the client 60 us a
    read), or ``setup`` and the read pipelined."""
    if setup is None:
        await cursor.execute(query, parameters, prepare=True)
        return
    async with connection.pipeline():
        await connection.execute(setup, prepare=True)
        await cursor.execute(query, parameters, prepare=True)

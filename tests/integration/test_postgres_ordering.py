"""PostgreSQL event storage under concurrency: no skipped events, atomic conditions,
the publish function's own rules."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from eventmill import (
    NewEvent,
    StorageError,
    StoredEvent,
    UnmetWriteConditionError,
    position_is,
    stream_is_empty,
)
from eventmill.backends.postgres import PostgresBackend, event_storage
from eventmill.backends.postgres.driver_errors import translate_driver_errors
from eventmill.backends.postgres.schema import PUBLISH_LOCK_CLASS
from eventmill.events import stream_hash
from eventmill.store import EventSourceHandle, EventStore
from tests.postgres_support import TEST_DSN, connect, fresh_postgres_backend

pytestmark = pytest.mark.postgres

RAW_PUBLISH = "SELECT * FROM {schema}.publish(%s, %s, %s, NULL, %s::jsonb)"


def events(count: int) -> list[NewEvent]:
    return [NewEvent(name="happened", payload={"n": number}) for number in range(count)]


async def raw_publish(
    connection: psycopg.AsyncConnection[Any],
    backend: PostgresBackend,
    category: str,
    stream: str,
    count: int,
) -> list[str]:
    """Call the publish function on ``connection`` (in whatever transaction it is in);
    return the new events' ids."""
    ids, _ = await raw_publish_numbered(connection, backend, category, stream, count)
    return ids


async def raw_publish_numbered(
    connection: psycopg.AsyncConnection[Any],
    backend: PostgresBackend,
    category: str,
    stream: str,
    count: int,
) -> tuple[list[str], int]:
    """``raw_publish``, also returning the last sequence number taken."""
    now = datetime.now(UTC).isoformat()
    batch = [["raw", {"n": number}, {}, now] for number in range(count)]
    cursor = await connection.execute(
        backend.sql(RAW_PUBLISH), (category, stream, stream_hash(stream), Jsonb(batch))
    )
    row = await cursor.fetchone()
    assert row is not None
    ids: list[str] = row[3].split(",")
    return ids, row[0] + count - 1


async def wait_until(condition: Callable[[], Awaitable[bool]], seconds: float = 20.0) -> None:
    """Return once ``condition()`` holds; fail the test after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not await condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.01)


@asynccontextmanager
async def second_backend(schema: str, max_size: int = 1) -> AsyncIterator[PostgresBackend]:
    """Another backend, on a pool of its own, over the same schema (another "process")."""
    async with AsyncConnectionPool(
        TEST_DSN, min_size=1, max_size=max_size, kwargs={"autocommit": True}, open=False
    ) as pool:
        await pool.wait()
        yield PostgresBackend(pool, schema=schema)


CATEGORIES = ["alpha", "beta", "gamma", "delta"]
WRITERS = 8
EVENTS_PER_WRITER = 500


async def test_every_reader_sees_every_committed_event_once_in_order() -> None:
    """Half the writers publish through EventStore; the other half, on connections of
    their own, hold their transactions open for random delays and roll some back.
    Readers of the log and of every category poll throughout, by ``read`` and by
    ``iterate``."""
    async with fresh_postgres_backend(max_size=8) as backend:
        store = EventStore(backend)
        committed: dict[str, str] = {}  # id -> category
        rolled_back: set[str] = set()
        last_committed = 0
        stop_polling = asyncio.Event()

        async def api_writer(number: int) -> None:
            nonlocal last_committed
            rng = random.Random(number)
            written = 0
            while written < EVENTS_PER_WRITER:
                count = min(rng.randint(1, 5), EVENTS_PER_WRITER - written)
                category = rng.choice(CATEGORIES)
                stream = store.stream(category=category, stream=f"s{rng.randrange(20)}")
                for stored in await stream.publish(events(count)):
                    committed[stored.id] = category
                    last_committed = max(last_committed, stored.sequence_number)
                written += count

        async def slow_writer(number: int) -> None:
            nonlocal last_committed
            rng = random.Random(number)
            written = 0
            async with await connect() as connection:
                while written < EVENTS_PER_WRITER:
                    count = min(rng.randint(1, 5), EVENTS_PER_WRITER - written)
                    category = rng.choice(CATEGORIES)
                    roll_back = rng.random() < 0.2
                    async with connection.transaction():
                        ids, last = await raw_publish_numbered(
                            connection, backend, category, f"s{rng.randrange(20)}", count
                        )
                        if rng.random() < 0.5:
                            await asyncio.sleep(rng.uniform(0, 0.03))  # hold it open
                        if roll_back:
                            rolled_back.update(ids)
                            raise psycopg.Rollback()
                    if not roll_back:
                        committed.update(dict.fromkeys(ids, category))
                        last_committed = max(last_committed, last)
                        written += count

        async def reader(handle: EventSourceHandle) -> list[StoredEvent]:
            seen: list[StoredEvent] = []
            after: int | None = None
            while True:
                stopping = stop_polling.is_set()
                page = await handle.read(after=after, limit=300)
                seen.extend(page)
                if page:
                    after = page[-1].sequence_number
                elif stopping:
                    return seen
                else:
                    await asyncio.sleep(0.005)  # poll again

        async def iterating_reader(handle: EventSourceHandle) -> list[StoredEvent]:
            """Iterations in small pages (each page read ahead of the one handed out),
            each resuming where the one before ended."""
            seen: list[StoredEvent] = []
            while True:
                stopping = stop_polling.is_set()
                after = seen[-1].sequence_number if seen else None
                before = len(seen)
                seen += [event async for event in handle.iterate(after=after, page_size=7)]
                if len(seen) == before:
                    if stopping:
                        return seen
                    await asyncio.sleep(0.005)  # poll again

        async def everything_visible() -> bool:
            latest = await store.log().latest()
            return latest is not None and latest.sequence_number >= last_committed

        handles = [store.log(), *(store.category(c) for c in CATEGORIES)]
        async with asyncio.timeout(60):
            readers = [asyncio.create_task(reader(handle)) for handle in handles]
            readers += [asyncio.create_task(iterating_reader(handle)) for handle in handles]
            await asyncio.gather(
                *((api_writer if number % 2 else slow_writer)(number) for number in range(WRITERS))
            )
            await wait_until(everything_visible)
            stop_polling.set()
            results = await asyncio.gather(*readers)
        assert len(committed) == WRITERS * EVENTS_PER_WRITER
        assert rolled_back and not rolled_back & set(committed)
        for handle, seen in zip(handles * 2, results, strict=True):
            numbers = [event.sequence_number for event in seen]
            assert numbers == sorted(set(numbers)), f"{handle}: out of order or repeated"
            ids = [event.id for event in seen]
            assert len(ids) == len(set(ids)), f"{handle}: an event seen twice"
            category = getattr(handle.identifier, "category", None)
            wanted = {i for i, c in committed.items() if category in (None, c)}
            assert not set(ids) - wanted, f"{handle}: rolled-back or foreign events seen"
            assert not wanted - set(ids), f"{handle}: {len(wanted - set(ids))} events missed"


async def test_an_open_transaction_hides_later_events_until_it_ends() -> None:
    async with fresh_postgres_backend() as backend, await connect() as holder:
        store = EventStore(backend)
        async with holder.transaction():
            held = await raw_publish(holder, backend, "c", "held", 2)
            later = await store.stream(category="c", stream="other").publish(events(1))
            assert await store.log().read() == []
            assert await store.category("c").read() == []
            assert await store.log().latest() is None
            assert await store.category("c").latest() is None
            # Streams need no filter: positions commit in order under the stream's row lock.
            assert await store.stream(category="c", stream="other").read() == later

        async def both_visible() -> bool:
            return len(await store.log().read()) == 3

        await wait_until(both_visible)
        assert [e.id for e in await store.log().read()] == [*held, later[0].id]
        assert [e.id for e in await store.category("c").read()] == [*held, later[0].id]
        assert (await store.log().latest()) == later[0]


async def test_an_open_transaction_that_does_not_publish_delays_nothing() -> None:
    """Only publishers in flight hold the watermark back: a checkpoint transaction or a
    user's own long transaction, holding a transaction id, does not."""
    async with fresh_postgres_backend() as backend, await connect() as holder:
        store = EventStore(backend)
        async with holder.transaction():
            await holder.execute("SELECT pg_current_xact_id()")  # holds an xid, open
            published = await store.stream(category="c", stream="s").publish(events(2))
            assert await store.log().read() == published
            assert await store.category("c").read() == published
            assert await store.log().latest() == published[-1]


async def test_a_rolled_back_publish_is_never_seen_and_does_not_block() -> None:
    async with fresh_postgres_backend() as backend, await connect() as holder:
        store = EventStore(backend)
        async with holder.transaction():
            await raw_publish(holder, backend, "c", "s", 3)
            raise psycopg.Rollback()
        later = await store.stream(category="c", stream="s").publish(events(1))
        assert later[0].position == 0

        async def visible() -> bool:
            return len(await store.log().read()) > 0

        await wait_until(visible)
        assert await store.log().read() == later


async def test_two_processes_racing_with_the_same_condition_one_wins_every_round() -> None:
    async with (
        fresh_postgres_backend(max_size=1) as first,
        second_backend(first.schema) as second,
    ):
        stores = [EventStore(first), EventStore(second)]
        for round_number in range(40):
            name = f"r{round_number}"
            condition = stream_is_empty()
            if round_number % 2:
                await stores[0].stream(category="race", stream=name).publish(events(1))
                condition = position_is(0)
            outcomes = await asyncio.gather(
                *(
                    store.stream(category="race", stream=name).publish(
                        events(2), condition=condition
                    )
                    for store in stores
                ),
                return_exceptions=True,
            )
            winners = [o for o in outcomes if isinstance(o, list)]
            losers = [o for o in outcomes if isinstance(o, UnmetWriteConditionError)]
            assert (len(winners), len(losers)) == (1, 1), outcomes
            expected_length = 2 + round_number % 2
            assert losers[0].found == expected_length - 1
            stream = await stores[1].stream(category="race", stream=name).read()
            assert [e.position for e in stream] == list(range(expected_length))


@pytest.mark.parametrize("stream_exists", [False, True])
@pytest.mark.parametrize("holder_commits", [False, True])
async def test_a_writer_waits_for_an_open_write_to_its_stream_then_sees_its_outcome(
    stream_exists: bool, holder_commits: bool
) -> None:
    async with (
        fresh_postgres_backend(max_size=1) as backend,
        await connect() as holder,
        await connect() as observer,
    ):
        store = EventStore(backend)
        stream = store.stream(category="c", stream="s")
        if stream_exists:
            await stream.publish(events(1))
        before = 1 if stream_exists else 0
        async with backend.connection() as connection:
            cursor = await connection.execute("SELECT pg_backend_pid()")
            pid = (await cursor.fetchone() or [0])[0]
        condition = position_is(0) if stream_exists else stream_is_empty()
        try:
            async with holder.transaction():
                await raw_publish(holder, backend, "c", "s", 2)
                waiter = asyncio.create_task(stream.publish(events(1), condition=condition))

                async def waiter_is_blocked() -> bool:
                    # Autocommit, so each check reads fresh activity statistics.
                    cursor = await observer.execute(
                        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
                    )
                    row = await cursor.fetchone()
                    return row is not None and row[0] == "Lock"

                await wait_until(waiter_is_blocked)
                assert not waiter.done()
                if not holder_commits:
                    raise psycopg.Rollback()
        finally:
            outcome = await asyncio.gather(waiter, return_exceptions=True)
        if holder_commits:
            assert isinstance(outcome[0], UnmetWriteConditionError)
            assert outcome[0].found == before + 1
            assert [e.position for e in await stream.read()] == list(range(before + 2))
        else:
            assert isinstance(outcome[0], list)
            assert outcome[0][0].position == before
            assert [e.position for e in await stream.read()] == list(range(before + 1))


async def test_publishing_after_another_write_in_the_same_transaction_is_refused() -> None:
    async with fresh_postgres_backend() as backend, await connect() as connection:
        async with connection.transaction():
            await connection.execute("SELECT pg_current_xact_id()")
            with (
                pytest.raises(StorageError, match="first write of its transaction") as refused,
                translate_driver_errors(backend.schema),
            ):
                await raw_publish(connection, backend, "c", "s", 1)
            raise psycopg.Rollback()
        assert isinstance(refused.value.__cause__, psycopg.Error)
        assert (
            await backend.events.read(EventStore(backend).log().identifier, after=None, limit=10)
            == []
        )
        async with connection.transaction():
            assert len(await raw_publish(connection, backend, "c", "s", 1)) == 1


async def test_a_failure_inside_the_critical_section_releases_its_lock() -> None:
    async with fresh_postgres_backend(max_size=1) as backend:
        store = EventStore(backend)
        stream = store.stream(category="c", stream="s")
        await stream.publish(events(2))
        async with backend.connection() as connection:
            cursor = await connection.execute("SELECT pg_backend_pid()")
            pid = (await cursor.fetchone() or [0])[0]
            await connection.execute(
                backend.sql("ALTER SEQUENCE {schema}.event_sequence_numbers MAXVALUE 2")
            )
        with pytest.raises(StorageError, match="maximum value"):
            await stream.publish(events(1))
        async with await connect() as observer:
            cursor = await observer.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND classid = %s AND pid = %s",
                (PUBLISH_LOCK_CLASS, pid),
            )
            assert (await cursor.fetchone() or [None])[0] == 0
            await observer.execute(
                backend.sql("ALTER SEQUENCE {schema}.event_sequence_numbers NO MAXVALUE")
            )
        async with second_backend(backend.schema) as other:
            stored = await EventStore(other).stream(category="c", stream="s").publish(events(1))
        assert stored[0].position == 2


async def _scans(
    connection: psycopg.AsyncConnection[Any], backend: PostgresBackend
) -> tuple[int, int]:
    """The sequential scans of the events table and the rows fetched from it through
    an index, counted by this session and not yet flushed to the statistics."""
    cursor = await connection.execute(
        "SELECT seq_scan, idx_tup_fetch FROM pg_stat_xact_user_tables WHERE relid = %s::regclass",
        (f"{backend.schema}.events",),
    )
    row = await cursor.fetchone()
    assert row is not None
    return row[0], row[1]


async def test_a_stalled_read_examines_one_page() -> None:
    """With an open publish and many committed events beyond it, a log or category read
    reads one page of rows from the table, not everything beyond the watermark (counted
    by the table's statistics of the reading transaction, which see inside the read
    functions)."""
    page = 50
    async with fresh_postgres_backend() as backend, await connect() as holder:
        store = EventStore(backend)
        async with holder.transaction():
            await raw_publish(holder, backend, "c", "held", 1)
            for number in range(20):
                await store.stream(category="c", stream=f"s{number}").publish(events(100))
            assert await store.category("c").read() == []
            async with backend.connection() as connection:
                for query, parameters in (
                    (event_storage._READ_CATEGORY, ("c", 0, page)),
                    (event_storage._READ_LOG, (0, page)),
                ):
                    async with connection.transaction():  # no statistics flushed inside
                        before = await _scans(connection, backend)
                        cursor = await connection.execute(backend.sql(query), parameters)
                        assert await cursor.fetchall() == []
                        after = await _scans(connection, backend)
                    assert after[0] == before[0]  # no sequential scan
                    assert 0 < after[1] - before[1] <= page  # rows fetched through an index


async def test_log_and_category_reads_are_volatile_functions() -> None:
    """The read functions take the watermark, then read in a statement of their own;
    that statement has a newer snapshot (under READ COMMITTED) only because they are
    volatile: a stable one would read at the watermark's snapshot and could return an
    event whose earlier publisher ended between that snapshot and its probe."""
    async with fresh_postgres_backend() as backend, backend.connection() as connection:
        cursor = await connection.execute(
            "SELECT proname, provolatile FROM pg_proc WHERE pronamespace = %s::regnamespace"
            " AND proname IN ('read_log', 'read_category') ORDER BY proname",
            (backend.schema,),
        )
        assert await cursor.fetchall() == [("read_category", "v"), ("read_log", "v")]


async def test_the_watermark_looks_past_transactions_that_do_not_publish() -> None:
    """The watermark probes each transaction running at its snapshot, lowest first:
    older transactions that hold an xid but never publish are passed over, the first
    publisher in flight stops the read, and no probe's lock is left behind."""
    async with (
        fresh_postgres_backend() as backend,
        await connect() as idle_one,
        await connect() as idle_two,
        await connect() as publisher,
    ):
        store = EventStore(backend)
        before = await store.stream(category="c", stream="early").publish(events(2))
        async with idle_one.transaction(), idle_two.transaction(), publisher.transaction():
            await idle_one.execute("SELECT pg_current_xact_id()")
            await idle_two.execute("SELECT pg_current_xact_id()")
            middle = await store.stream(category="c", stream="middle").publish(events(2))
            held = await raw_publish(publisher, backend, "c", "held", 1)
            after = await store.stream(category="c", stream="late").publish(events(1))
            for _ in range(3):
                assert await store.log().read() == [*before, *middle]
                assert await store.category("c").read() == [*before, *middle]
            async with backend.connection() as connection:
                cursor = await connection.execute(
                    backend.sql(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                        " AND mode = 'ExclusiveLock' AND objsubid = 1 AND classid ="
                        " '{schema}.event_sequence_numbers'::regclass::oid"
                    )
                )
                assert await cursor.fetchone() == (0,)

        async def all_visible() -> bool:
            return len(await store.log().read()) == 6

        await wait_until(all_visible)
        assert [e.id for e in await store.log().read()] == [
            *(e.id for e in [*before, *middle]),
            *held,
            after[0].id,
        ]

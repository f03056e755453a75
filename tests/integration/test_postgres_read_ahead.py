"""PostgreSQL reads that read the next page ahead (``PostgresEventStorage.pages``, behind
``iterate``): an iteration broken off or cancelled leaves the pool's connections idle,
and times come back in UTC whatever the session's time zone. (Read-ahead under
concurrent publishes: ``test_postgres_ordering``.)"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from eventmill import CategoryIdentifier, NewEvent, StoredEvent
from eventmill.backends.postgres import PostgresBackend, event_storage
from eventmill.sources import EventSource
from eventmill.store import EventStore
from tests.delay_proxy import DelayProxy
from tests.postgres_support import TEST_DSN, fresh_postgres_backend

pytestmark = pytest.mark.postgres


def events(count: int) -> list[NewEvent]:
    return [NewEvent(name="happened", payload={"n": number}) for number in range(count)]


async def idle_connection_state(pool: AsyncConnectionPool[Any]) -> psycopg.pq.TransactionStatus:
    """The transaction status of the pool's one connection, taken without waiting."""
    async with pool.connection(timeout=0.001) as connection:
        await connection.execute("SELECT 1")
        status: psycopg.pq.TransactionStatus = connection.info.transaction_status
        return status


async def test_an_iteration_closed_early_waits_for_its_read_ahead() -> None:
    """With one pooled connection, the read ahead holds it until its rows arrive: once
    the closed iteration returns, the connection is back in the pool, idle."""
    async with fresh_postgres_backend(max_size=1) as backend:
        store = EventStore(backend)
        await store.stream(category="c", stream="s").publish(events(50))
        seen: list[StoredEvent] = []
        async with aclosing(store.category("c").iterate(page_size=10)) as iterating:
            async for event in iterating:
                seen.append(event)
                break
        assert backend.pool.get_stats()["pool_available"] == 1
        assert await idle_connection_state(backend.pool) == psycopg.pq.TransactionStatus.IDLE
        assert [e.payload["n"] for e in seen] == [0]
        assert len(await store.category("c").read()) == 50


async def test_an_iteration_left_behind_gives_its_connection_back() -> None:
    """A loop left with ``break`` and no ``aclosing``: the generator is closed when it is
    collected, and the next read on the one-connection pool gets the connection."""
    async with fresh_postgres_backend(max_size=1) as backend:
        store = EventStore(backend)
        await store.stream(category="c", stream="s").publish(events(50))
        for _ in range(3):
            async for event in store.category("c").iterate(page_size=10):
                assert event.position == 0
                break
            async with asyncio.timeout(10):
                assert len(await store.category("c").read(limit=25)) == 25
        async with asyncio.timeout(10):
            assert len(await store.log().read()) == 50


async def test_a_reader_cancelled_while_a_page_is_ahead_leaves_the_pool_usable() -> None:
    """Round trips slowed by a proxy: the reader is cancelled while it waits for the page
    read ahead; that query is cancelled, and the pool's connection serves the next read."""
    async with (
        fresh_postgres_backend() as setup,
        DelayProxy("127.0.0.1", 5432) as proxy,
        AsyncConnectionPool(
            proxy.dsn(TEST_DSN), min_size=1, max_size=1, kwargs={"autocommit": True}
        ) as slow_pool,
    ):
        await EventStore(setup).stream(category="c", stream="s").publish(events(30))
        store = EventStore(PostgresBackend(slow_pool, schema=setup.schema))
        first_page = asyncio.Event()
        seen: list[StoredEvent] = []

        async def read_all() -> None:
            async for event in store.category("c").iterate(page_size=10):
                seen.append(event)
                first_page.set()

        async with asyncio.timeout(30):
            await store.category("c").latest()  # the pool's connection is set up
            proxy.delay = 0.5
            reader = asyncio.create_task(read_all())
            await first_page.wait()  # the reader now waits for the second page, 0.5 s away
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
            assert len(seen) == 10
            proxy.delay = 0.0
            read = await store.category("c").read()
        assert [e.payload["n"] for e in read] == list(range(30))
        assert await idle_connection_state(slow_pool) == psycopg.pq.TransactionStatus.IDLE


async def test_pages_in_batches_are_decoded_as_they_are_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The next page's read goes out first; then each batch's rows become events only
    when the caller asks for that batch, not the whole page at once."""
    decoded: list[int] = []
    event_from_row = event_storage._event_from_row

    def counting(row: Any) -> StoredEvent:
        decoded.append(1)
        return event_from_row(row)

    async with fresh_postgres_backend() as backend:
        await EventStore(backend).stream(category="c", stream="s").publish(events(25))
        monkeypatch.setattr(event_storage, "_event_from_row", counting)
        asked: list[int] = []
        pages = backend.events.pages(CategoryIdentifier("c"), after=None, limit=10, batch=4)
        async with aclosing(pages):
            async for batch in pages:
                asked.append(len(decoded))
                assert len(batch) <= 4
        assert asked == [4, 8, 10, 14, 18, 20, 24, 25]  # decoded when each is handed out
        assert len(decoded) == 25


async def test_an_event_source_iterates_reading_the_next_page_ahead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``EventSource.iterate`` reads as ``EventStore`` iteration does: when the first event
    of a full page is handed out, the next page's read has gone out already."""
    sent: list[int] = []
    execute = event_storage.PostgresEventStorage._execute

    async def counting(self: event_storage.PostgresEventStorage, *args: Any) -> Any:
        sent.append(1)
        return await execute(self, *args)

    async with fresh_postgres_backend() as backend:
        await EventStore(backend).stream(category="c", stream="s").publish(events(25))
        monkeypatch.setattr(event_storage.PostgresEventStorage, "_execute", counting)
        source = EventSource(backend, CategoryIdentifier("c"), page_size=10)
        reads_at: dict[int, int] = {}
        async with aclosing(source.iterate()) as iterating:
            async for event in iterating:
                reads_at[event.position] = len(sent)
        assert sorted(reads_at) == list(range(25))
        assert (reads_at[0], reads_at[10], reads_at[20]) == (2, 3, 3)


async def test_times_are_read_in_utc_whatever_the_session_time_zone() -> None:
    occurred = datetime(2025, 6, 30, 23, 30, 0, 250_000, tzinfo=UTC)
    extremes = [datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)]
    async with (
        fresh_postgres_backend() as setup,
        AsyncConnectionPool(
            TEST_DSN,
            min_size=1,
            max_size=1,
            kwargs={"autocommit": True, "options": "-c timezone=Asia/Kolkata"},
        ) as zoned_pool,
    ):
        store = EventStore(PostgresBackend(zoned_pool, schema=setup.schema))
        stream = store.stream(category="c", stream="s")
        published = await stream.publish(
            [NewEvent(name="t", occurred_at=moment) for moment in [occurred, *extremes]]
        )
        assert published[0].observed_at.tzinfo is UTC
        for read in (await stream.read(), await store.category("c").read()):
            assert read == published
            assert [e.occurred_at for e in read] == [occurred, *extremes]
            for event in read:
                assert event.occurred_at.tzinfo is UTC and event.observed_at.tzinfo is UTC

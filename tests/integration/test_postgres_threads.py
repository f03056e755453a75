"""PostgresBackend used from other threads' event loops: a node's SHARED_THREAD and
DEDICATED_THREAD subscribers process every event once on a backend made by ``connect``,
and an ended loop, a stopped node and a closed backend leave no thread or connection;
a backend on the user's pool refuses other loops with a clear error."""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

from eventmill.backends.postgres import PostgresBackend
from eventmill.consumers import EventProcessor
from eventmill.errors import LifecycleError
from eventmill.events import CategoryIdentifier, LogIdentifier, NewEvent, StoredEvent
from eventmill.node import EventProcessingNode
from eventmill.services.manager import IsolationMode
from eventmill.store import EventStore
from tests.postgres_support import TEST_DSN, drop_schema, unique_schema_name
from tests.unit.services.conditions import wait_until
from tests.unit.test_node import DISTRIBUTED

pytestmark = pytest.mark.postgres

T = TypeVar("T")


class Counting(EventProcessor):
    """Counts each event it processes (by id) and the threads it ran on; with a
    ``store``, publishes a receipt for each one (from the processing thread's loop)."""

    def __init__(self, store: EventStore | None = None) -> None:
        self.seen: Counter[str] = Counter()
        self.threads: set[int] = set()
        self._store = store

    async def process_event(self, event: StoredEvent) -> None:
        self.seen[event.id] += 1
        self.threads.add(threading.get_ident())
        if self._store is not None:
            await self._store.stream(category="receipts", stream=event.stream).publish(
                [NewEvent(name="receipt", payload={"order": event.id})]
            )


async def connections_named(application_name: str) -> int:
    """How many server sessions have ``application_name`` now."""
    async with await psycopg.AsyncConnection.connect(TEST_DSN, autocommit=True) as connection:
        cursor = await connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        )
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def wait_for_no_connections(application_name: str) -> None:
    """Return once no session has ``application_name``; fail after 10 s."""
    async with asyncio.timeout(10):
        while await connections_named(application_name):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def in_thread(work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work()`` in a new thread on a loop of its own (``asyncio.run``); blocks."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def main() -> None:
        try:
            outcome.append(asyncio.run(_call(work)))
        except BaseException as error:
            failure.append(error)

    thread = threading.Thread(target=main)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


async def _call(work: Callable[[], Awaitable[T]]) -> T:
    return await work()


@pytest.fixture
async def named_backend() -> AsyncIterator[tuple[PostgresBackend, str]]:
    """A backend made by ``connect`` in a schema of its own, whose sessions carry an
    application name of their own (so the test can count them), and that name."""
    name = f"em-threads-{secrets.token_hex(4)}"
    schema = unique_schema_name()
    backend = await PostgresBackend.connect(
        make_conninfo(TEST_DSN, application_name=name),
        schema=schema,
        max_size=4,
        per_loop_max_size=2,
    )
    try:
        await backend.install_schema()
        yield backend, name
    finally:
        await backend.close()
        await drop_schema(schema)


async def test_thread_isolated_subscribers_process_everything_once_and_leave_nothing(
    named_backend: tuple[PostgresBackend, str],
) -> None:
    backend, name = named_backend
    store = EventStore(backend)
    threads_before = threading.active_count()

    async def publish(start: int, count: int) -> list[str]:
        ids: list[str] = []
        for number in range(start, start + count):
            stored = await store.stream(category="orders", stream=f"order-{number % 5}").publish(
                [NewEvent(name="order-placed", payload={"n": number})]
            )
            ids.extend(event.id for event in stored)
        return ids

    ids = await publish(0, 30)
    dedicated = Counting(store)
    shared = Counting()
    receipts = Counting()
    node = EventProcessingNode(backend, node_id="n1", settings=DISTRIBUTED)
    node.register_subscriber(
        group="dedicated",
        source=CategoryIdentifier("orders"),
        processor=dedicated,
        isolation_mode=IsolationMode.DEDICATED_THREAD,
    )
    node.register_subscriber(
        group="shared",
        source=CategoryIdentifier("orders"),
        processor=shared,
        isolation_mode=IsolationMode.SHARED_THREAD,
    )
    node.register_subscriber(
        group="receipts",
        source=CategoryIdentifier("receipts"),
        processor=receipts,
        isolation_mode=IsolationMode.SHARED_THREAD,
    )
    async with node:
        ids += await publish(30, 30)
        await wait_until(lambda: sum(receipts.seen.values()) >= 60, within=30)
        await node.wait_caught_up(timeout=timedelta(seconds=30))
        # A pool for each thread that ran a subscriber (the node gives each subscriber a
        # service manager of its own, so SHARED_THREAD ones do not share a thread).
        threads = dedicated.threads | shared.threads | receipts.threads
        assert backend.loop_pool_count == len(threads) == 3
    expected = Counter(dict.fromkeys(ids, 1))
    assert dedicated.seen == expected
    assert shared.seen == expected
    assert len(receipts.seen) == 60
    assert set(receipts.seen.values()) == {1}
    assert threading.get_ident() not in threads
    # The threads' loops ended with the node: their pools closed with them.
    assert threading.active_count() == threads_before
    assert backend.loop_pool_count == 0
    await backend.close()
    await wait_for_no_connections(name)


async def test_an_ended_loop_closes_its_pool_and_closing_reaches_running_loops(
    named_backend: tuple[PostgresBackend, str],
) -> None:
    backend, name = named_backend
    store = EventStore(backend)
    await store.stream(category="orders", stream="order-1").publish([NewEvent(name="placed")])
    home = await connections_named(name)

    async def read_and_count() -> tuple[int, int]:
        events = await store.log().read(limit=10)
        return len(events), await connections_named(name)

    found, during = in_thread(read_and_count)
    assert found == 1
    assert during == home + 1
    assert backend.loop_pool_count == 0
    assert await connections_named(name) == home

    # A loop still running when the backend closes: its idle connections close now,
    # and it can no longer borrow one.
    ready = threading.Event()
    closed = threading.Event()

    async def hold_loop_open() -> str:
        await backend.events.read(LogIdentifier(), after=None, limit=1)
        ready.set()
        while not closed.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        try:
            await backend.events.read(LogIdentifier(), after=None, limit=1)
        except LifecycleError as error:
            return str(error)
        return "no error"

    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(asyncio.run(hold_loop_open())))
    thread.start()
    await wait_until(ready.is_set, within=10)
    assert backend.loop_pool_count == 1
    await backend.close()
    closed.set()
    await wait_until(lambda: not thread.is_alive(), within=10)
    thread.join()
    assert outcome == ["this PostgresBackend is closed"]
    await wait_for_no_connections(name)


async def test_a_backend_on_the_users_pool_refuses_other_loops() -> None:
    schema = unique_schema_name()
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        TEST_DSN, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
    )
    await pool.open(wait=True)
    backend = PostgresBackend(pool, schema=schema)
    try:
        await backend.install_schema()
        store = EventStore(backend)
        with pytest.raises(LifecycleError, match=r"connect\(dsn\).*MAIN_THREAD"):
            in_thread(lambda: store.log().read(limit=1))
        assert await store.log().read(limit=1) == []  # the home loop still works
    finally:
        await backend.close()
        await pool.close()
        await drop_schema(schema)

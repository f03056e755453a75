"""BlockingEventStore: publishing from many threads with no event loop of their own
lands every event once, over one loop and one small pool (PostgreSQL: the store's
connections stay within the pool's size however many calls are made)."""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal

import pytest

from eventmill import BlockingEventStore, LifecycleError, NewEvent, stream_is_empty
from eventmill.backends.base import Backend
from eventmill.backends.memory import InMemoryBackend
from eventmill.backends.postgres import PostgresBackend
from tests.contracts.test_typed_events import OrderId, OrderPaid, types
from tests.postgres_support import TEST_DSN, drop_schema, unique_schema_name

THREADS = 4
PER_THREAD = 25


def publish_from_threads(store: BlockingEventStore) -> None:
    def work(thread: int) -> None:
        for number in range(PER_THREAD):
            store.publish("orders", f"t{thread}", [NewEvent(name="n", payload={"n": number})])

    threads = [threading.Thread(target=work, args=(thread,)) for thread in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def check(store: BlockingEventStore) -> None:
    events = store.read("orders")
    assert len(events) == THREADS * PER_THREAD
    for thread in range(THREADS):
        stream = store.read("orders", f"t{thread}")
        assert [event.payload["n"] for event in stream] == list(range(PER_THREAD))
    paid = OrderPaid(OrderId("o"), Decimal("1.5"))
    (stored,) = store.publish("orders", "typed", [paid], condition=stream_is_empty())
    assert types.decode(stored) == paid


async def make_memory() -> Backend:
    return InMemoryBackend()


def test_threads_publish_in_memory() -> None:
    with BlockingEventStore.start(make_memory) as store:
        publish_from_threads(store)
        check(store)
    with pytest.raises(LifecycleError):
        store.publish("orders", "late", [NewEvent(name="n")])


@pytest.mark.postgres
def test_threads_publish_on_postgres_over_one_small_pool() -> None:
    schema = unique_schema_name()
    name = f"blocking-{schema}"

    async def make() -> Backend:
        backend = await PostgresBackend.connect(
            TEST_DSN, schema=schema, max_size=2, application_name=name
        )
        await backend.install_schema()
        return backend

    try:
        with BlockingEventStore.start(make) as store:
            publish_from_threads(store)
            check(store)
            backend = store.backend
            assert isinstance(backend, PostgresBackend)

            async def connections() -> int:
                async with backend.connection() as connection:
                    cursor = await connection.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                        (name,),
                    )
                    row = await cursor.fetchone()
                    assert row is not None
                    return int(row[0])

            assert 1 <= store._call(connections()) <= 2
    finally:
        asyncio.run(drop_schema(schema))


async def test_calling_inside_an_event_loop_is_refused() -> None:
    store = await asyncio.to_thread(BlockingEventStore.start, make_memory)
    try:
        with pytest.raises(LifecycleError, match="inside an event loop"):
            store.read("orders")
    finally:
        await asyncio.to_thread(store.close)

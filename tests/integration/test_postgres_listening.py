"""The PostgreSQL listener: it wakes watchers on each NOTIFY, recovers from a lost
connection, and, while nothing is published, schedules no wake-up of its loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any
from unittest.mock import patch

import pytest
from psycopg import sql

from eventmill import EventStore, NewEvent
from eventmill.backends.postgres.notifications import channel_name
from eventmill.events import CategoryIdentifier
from tests.postgres_support import connect, fresh_postgres_backend

pytestmark = pytest.mark.postgres

ORDERS = CategoryIdentifier("orders")


async def publish(store: EventStore) -> None:
    await store.stream(category="orders", stream="o1").publish([NewEvent(name="placed")])


async def test_an_idle_listener_sets_no_timer_and_wakes_on_notify() -> None:
    async with fresh_postgres_backend() as backend:
        woken = asyncio.Event()
        remove = await backend.notifications.subscribe(ORDERS, woken.set)
        await asyncio.wait_for(woken.wait(), 10)  # everyone is woken once LISTEN ran
        woken.clear()
        loop = asyncio.get_running_loop()
        timers: list[Callable[..., Any]] = []
        call_at = loop.call_at

        def counted(when: float, callback: Callable[..., Any], *args: Any, **kw: Any) -> Any:
            timers.append(callback)
            return call_at(when, callback, *args, **kw)

        with patch.object(loop, "call_at", counted):
            # An observation window, waited out on another thread so that this loop
            # itself sets no timer (psycopg's notifies() would set one every 0.1 s).
            await asyncio.to_thread(time.sleep, 0.5)
        assert timers == []
        assert not woken.is_set()
        await publish(EventStore(backend))
        await asyncio.wait_for(woken.wait(), 10)
        remove()


async def test_a_lost_listening_connection_wakes_everyone_and_listens_again() -> None:
    async with fresh_postgres_backend() as backend:
        orders, payments = asyncio.Event(), asyncio.Event()
        removers = [await backend.notifications.subscribe(ORDERS, orders.set)]
        await asyncio.wait_for(orders.wait(), 10)  # everyone is woken once LISTEN ran
        payments_category = CategoryIdentifier("payments")
        removers.append(await backend.notifications.subscribe(payments_category, payments.set))
        listen = sql.SQL("LISTEN {}").format(sql.Identifier(channel_name(backend.schema)))
        admin = await connect()
        try:
            cursor = await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = %s",
                (listen.as_string(admin),),
            )
            assert await cursor.fetchall() == [(True,)]
            await asyncio.wait_for(payments.wait(), 10)  # notifications may have been lost
        finally:
            await admin.close()
        # Listening again: a publish on orders wakes its watcher alone (a wake-up of
        # everyone, as after each connect, would wake the payments watcher too).
        deadline = time.monotonic() + 10
        while True:
            orders.clear()
            payments.clear()
            await publish(EventStore(backend))
            await asyncio.wait_for(orders.wait(), 10)
            if not payments.is_set():
                break
            assert time.monotonic() < deadline, "the listener did not come back"
        for remove in removers:
            remove()

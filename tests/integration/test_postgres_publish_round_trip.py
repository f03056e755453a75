"""A publish on PostgreSQL drives libpq's pipeline itself (prepared statements, a Sync
after the publish and after its NOTIFY): statements deallocated under it are prepared
again, a commit refused at its Sync is raised with the connection still in step, and a
publish cancelled while the server works gives no connection back with answers unread."""

from __future__ import annotations

import asyncio

import pytest
from psycopg import sql

from eventmill import EventStore, NewEvent, StorageError
from eventmill.backends.postgres.notifications import channel_name
from tests.postgres_support import TEST_DSN, connect, fresh_postgres_backend, wait_for_lock_wait

pytestmark = pytest.mark.postgres


async def test_a_publish_prepares_its_statements_again_once_they_are_deallocated() -> None:
    async with fresh_postgres_backend(max_size=1) as backend:
        stream = EventStore(backend).stream(category="orders", stream="o1")
        await stream.publish([NewEvent(name="placed")])
        async with backend.connection() as connection:  # the pool's one connection
            await connection.execute("DEALLOCATE ALL")
        stored = await stream.publish([NewEvent(name="paid")])
        assert stored[0].position == 1
        assert [event.name for event in await stream.read()] == ["placed", "paid"]


async def test_a_commit_refused_at_its_sync_is_raised_and_the_next_publish_runs() -> None:
    async with fresh_postgres_backend(max_size=1) as backend:
        async with backend.connection() as connection:
            await connection.execute(
                backend.sql(
                    "CREATE FUNCTION {schema}.refuse() RETURNS trigger LANGUAGE plpgsql"
                    " AS $$ BEGIN RAISE EXCEPTION 'refused at commit'; END $$;"
                    " CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON {schema}.events"
                    " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
                    " WHEN (NEW.name = 'refused') EXECUTE FUNCTION {schema}.refuse()"
                )
            )
        listener = await connect()
        try:
            channel = sql.Identifier(channel_name(backend.schema))
            await listener.execute(sql.SQL("LISTEN {}").format(channel))
            stream = EventStore(backend).stream(category="orders", stream="o1")
            with pytest.raises(StorageError, match="refused at commit"):
                await stream.publish([NewEvent(name="refused")])
            stored = await stream.publish([NewEvent(name="accepted")])
            assert stored[0].position == 0
            assert [event.name for event in await stream.read()] == ["accepted"]
            heard = [n.payload async for n in listener.notifies(timeout=10, stop_after=2)]
            assert heard == ["orders", "orders"]
        finally:
            await listener.close()


async def test_a_publish_cancelled_while_the_server_works_leaves_the_pool_usable() -> None:
    async with fresh_postgres_backend(max_size=1) as backend:
        stream = EventStore(backend).stream(category="orders", stream="o1")
        await stream.publish([NewEvent(name="first")])
        blocker = await connect()
        try:
            await blocker.execute("BEGIN")
            await blocker.execute(
                backend.sql("SELECT 1 FROM {schema}.streams WHERE stream = 'o1' FOR UPDATE")
            )
            waiting = asyncio.create_task(stream.publish([NewEvent(name="second")]))
            await wait_for_lock_wait(TEST_DSN, "%publish($1%")
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await blocker.execute("ROLLBACK")
        finally:
            await blocker.close()
        # The cancelled publish's outcome is unknown (its Sync was sent); whichever it
        # was, the pool's connection answers this publish in step with it.
        stored = await stream.publish([NewEvent(name="third")])
        names = [event.name for event in await stream.read()]
        assert names in (["first", "third"], ["first", "second", "third"])
        assert stored[0].position == len(names) - 1

"""How a publish on PostgreSQL announces its category: a NOTIFY sent in the publish's
round trip, in a transaction of its own after the publish's."""

from __future__ import annotations

import pytest
from psycopg import sql

from eventmill import EventStore, NewEvent, UnmetWriteConditionError, stream_is_empty
from eventmill.backends.postgres.notifications import channel_name
from tests.postgres_support import connect, fresh_postgres_backend

pytestmark = pytest.mark.postgres


async def test_each_publish_is_announced_in_a_transaction_apart() -> None:
    async with fresh_postgres_backend() as backend:
        listener = await connect()
        try:
            channel = sql.Identifier(channel_name(backend.schema))
            await listener.execute(sql.SQL("LISTEN {}").format(channel))
            stream = EventStore(backend).stream(category="orders", stream="o1")
            await stream.publish([NewEvent(name="placed")])
            await (
                EventStore(backend)
                .stream(category="refunds", stream="r1")
                .publish([NewEvent(name="asked")])
            )
            heard = [n.payload async for n in listener.notifies(timeout=10, stop_after=2)]
            assert heard == ["orders", "refunds"]
            # A refused publish is announced too: its NOTIFY runs after the publish's
            # transaction ended (inside it, it would have been rolled back with it).
            with pytest.raises(UnmetWriteConditionError):
                await stream.publish([NewEvent(name="placed")], condition=stream_is_empty())
            heard = [n.payload async for n in listener.notifies(timeout=10, stop_after=1)]
            assert heard == ["orders"]
        finally:
            await listener.close()

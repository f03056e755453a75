"""A fence whose assignment is never applied (PostgreSQL): the coordinator fences a
source's checkpoint at the new epoch, then its apply fails (as when the database
fails or leadership is lost between the two) while the holder, judged dead, is in
fact alive. The holder stays ASSIGNED at the old epoch, its next save meets
StaleEpochError and it drops the source; its observer must release it so that it is
assigned again under the fenced epoch and processing resumes. The stale holder's
batch commits nothing: exactly once. Rounds are run by hand, in order; no sleeps."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from eventmill.backends.base import ConsumerTransaction, SubscriptionChange
from eventmill.backends.postgres import PostgresBackend
from eventmill.broker.coordinator import EventSubscriptionCoordinator
from eventmill.broker.observer import EventSubscriptionObserver
from eventmill.consumers import TransactionalEventProcessor
from eventmill.consumers.subscription_consumer import EventSubscriptionConsumer
from eventmill.errors import StorageError
from eventmill.events import EventSourceIdentifier, NewEvent, StoredEvent, StreamIdentifier
from eventmill.store import EventStore
from tests.postgres_support import fresh_postgres_backend

pytestmark = pytest.mark.postgres

X = StreamIdentifier("orders", "o-1")


class Rows(TransactionalEventProcessor):
    """Inserts one ``seen`` row per event in the batch's checkpoint transaction."""

    def __init__(self, backend: PostgresBackend) -> None:
        self.insert = backend.sql("INSERT INTO {schema}.seen (event_id) SELECT unnest(%s::text[])")

    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        connection = transaction.connection
        assert connection is not None  # PostgreSQL
        await connection.execute(self.insert, ([event.id for event in events],))


def subscriber(backend: PostgresBackend, id: str) -> EventSubscriptionConsumer:
    processor = Rows(backend)
    return EventSubscriptionConsumer(
        backend,
        group="g",
        id=id,
        subscription_requests=[X],
        processor_factory=lambda _source: processor,
    )


async def seen(backend: PostgresBackend) -> list[str]:
    async with backend.connection() as connection:
        cursor = await connection.execute(
            backend.sql("SELECT event_id FROM {schema}.seen ORDER BY event_id")
        )
        return [row[0] for row in await cursor.fetchall()]


async def holding(backend: PostgresBackend) -> tuple[str | None, int]:
    (only,) = await backend.subscriptions.list()
    return only.subscriber_id, only.epoch


async def test_a_live_holder_fenced_by_an_unapplied_assignment_gives_the_source_back() -> None:
    async with fresh_postgres_backend(max_size=4) as backend:
        async with backend.connection() as connection:
            await connection.execute(backend.sql("CREATE TABLE {schema}.seen (event_id text)"))
        stream = EventStore(backend).stream(category="orders", stream="o-1")
        subscribers = {"n1": subscriber(backend, "s1"), "n2": subscriber(backend, "s2")}
        observers = {node: EventSubscriptionObserver(backend, node) for node in subscribers}
        for node, member in subscribers.items():
            observers[node].add(member)
            await backend.subscribers.register("g", member.id, node, [X])
        coordinator = EventSubscriptionCoordinator(backend)

        async def heartbeat() -> None:
            for node, member in subscribers.items():
                await backend.subscribers.heartbeat("g", member.id, node, [X])

        async def one_round() -> int:
            await heartbeat()
            await coordinator.run_round()
            for observer in observers.values():
                await observer.run_round()
            return sum([await member.consume_all() for member in subscribers.values()])

        try:
            first = await stream.publish([NewEvent(name="placed", payload={})])
            assert await one_round() == 1
            assert await holding(backend) == ("s1", 1)

            # s1 looks dead to the coordinator; its takeover is fenced, then not applied
            async with backend.connection() as connection:
                await connection.execute(
                    backend.sql(
                        "UPDATE {schema}.subscribers SET last_seen = now() - interval '1 hour'"
                        " WHERE subscriber_id = 's1'"
                    )
                )
            apply = backend.subscriptions.apply
            failures: list[Sequence[SubscriptionChange]] = []

            async def failing_apply(changes: Sequence[SubscriptionChange]) -> None:
                failures.append(changes)
                raise StorageError("injected: the apply after the fence failed")

            backend.subscriptions.apply = failing_apply  # type: ignore[method-assign]
            try:
                with pytest.raises(StorageError, match="injected"):
                    await coordinator.run_round()
            finally:
                backend.subscriptions.apply = apply  # type: ignore[method-assign]
            assert len(failures) == 1
            fenced = await backend.checkpoints.get("g", X)
            assert fenced is not None and fenced.epoch == 2
            assert await holding(backend) == ("s1", 1)  # s1 is alive and still holds X

            second = await stream.publish([NewEvent(name="placed", payload={})])
            rounds = 0
            while await seen(backend) != sorted([first[0].id, second[0].id]):
                rounds += 1
                assert rounds <= 5, f"X stalled: held {await holding(backend)}"
                await one_round()
            holder, epoch = await holding(backend)
            assert holder is not None and epoch == 2
            held: dict[str, dict[EventSourceIdentifier, int]] = {
                member.id: dict(member.sources) for member in subscribers.values()
            }
            assert held[holder] == {X: 2}
            checkpoint = await backend.checkpoints.get("g", X)
            assert checkpoint is not None
            assert (checkpoint.epoch, checkpoint.after) == (2, second[0].position)
        finally:
            for node, member in subscribers.items():
                await observers[node].remove(member)
            await coordinator._give_up()  # releases the coordinator lock

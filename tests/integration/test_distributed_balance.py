"""Balance and stickiness of the distributed broker on PostgreSQL: 4 instances of a
group hold 40 sources; a fifth joining moves exactly 8; one leaving moves only its own."""

from __future__ import annotations

import pytest

from eventmill.broker.distributed import DistributedEventBroker
from eventmill.events import EventSourceIdentifier, StreamIdentifier
from tests.postgres_support import fresh_postgres_backend
from tests.unit.broker.test_distributed import FAST, held_counts, running, wait_until
from tests.unit.broker.test_singleton import FakeSubscriber

pytestmark = pytest.mark.postgres

SOURCES = tuple(StreamIdentifier("orders", f"order-{n:02}") for n in range(40))


async def test_a_fifth_instance_moves_eight_and_a_leaving_one_only_its_own() -> None:
    async with fresh_postgres_backend(max_size=4) as backend:
        owners: dict[EventSourceIdentifier, str] = {}
        subscribers = [FakeSubscriber(f"s{n}", owners, SOURCES) for n in range(5)]
        brokers = [
            DistributedEventBroker(backend, node_id=f"n{n}", settings=FAST, coordinate=n == 0)
            for n in range(5)
        ]
        async with (
            running(brokers[0]),
            running(brokers[1]),
            running(brokers[2]),
            running(brokers[3]),
            running(brokers[4]),
        ):
            for broker, subscriber in list(zip(brokers, subscribers, strict=True))[:4]:
                await broker.register(subscriber)
            await wait_until(lambda: held_counts(subscribers[:4]) == [10] * 4, within=20)
            before = dict(owners)
            await brokers[4].register(subscribers[4])
            await wait_until(lambda: held_counts(subscribers) == [8] * 5, within=20)
            moved = {s for s in SOURCES if owners[s] != before[s]}
            assert len(moved) == 8
            assert {owners[s] for s in moved} == {"s4"}

            before = dict(owners)
            await brokers[2].unregister(subscribers[2])
            await wait_until(lambda: held_counts(subscribers) == [0, 10, 10, 10, 10], within=20)
            moved = {s for s in SOURCES if owners[s] != before[s]}
            assert moved == {s for s in SOURCES if before[s] == "s2"}
        holdings = await backend.subscriptions.list(group="g")
        assert len(holdings) == 40

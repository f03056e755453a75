"""A worker for the drain crash test: drains category ``drain`` with a per-event
processor that prints each event's sequence number before it counts as processed,
saving every 50 events (saves committing while the next events are processed); prints
``drained`` when done. Run: ``python -m tests.integration.drain_crash_worker DSN SCHEMA``."""

from __future__ import annotations

import asyncio
import sys

from eventmill import CategoryIdentifier, EventConsumerStateStore, EventSourceConsumer
from eventmill.backends.postgres import PostgresBackend
from eventmill.consumers import ConsumerSettings, EventProcessor
from eventmill.events import StoredEvent
from eventmill.sources import EventSource

DRAIN = CategoryIdentifier("drain")
EVERY = 50


class PrintNumbers(EventProcessor):
    async def process_event(self, event: StoredEvent) -> None:
        print(event.sequence_number, flush=True)  # written before the event counts


async def main(dsn: str, schema: str) -> None:
    backend = await PostgresBackend.connect(dsn, schema=schema, min_size=1, max_size=3)
    try:
        consumer = EventSourceConsumer(
            EventSource(backend, DRAIN, page_size=200),
            PrintNumbers(),
            EventConsumerStateStore(backend.checkpoints, "drain", DRAIN),
            settings=ConsumerSettings(checkpoint_every=EVERY),
        )
        while await consumer.consume_all():
            pass
        print("drained", flush=True)
    finally:
        await backend.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))

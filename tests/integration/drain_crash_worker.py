"""A worker for the drain crash test: drains category ``drain`` with a per-event
processor that prints each event's sequence number before it counts as processed,
saving every 50 events (saves committing while the next events are processed); prints
``drained`` when done. Run: ``python -m tests.integration.drain_crash_worker DSN SCHEMA``."""

from __future__ import annotations

import asyncio
import sys

from eventmill import CategoryIdentifier
from eventmill.consumers import EventProcessor
from eventmill.events import StoredEvent
from tests.integration.worker_support import drain

DRAIN = CategoryIdentifier("drain")
EVERY = 50


class PrintNumbers(EventProcessor):
    async def process_event(self, event: StoredEvent) -> None:
        print(event.sequence_number, flush=True)  # written before the event counts


async def main(dsn: str, schema: str) -> None:
    await drain(dsn, schema, DRAIN, "drain", PrintNumbers(), page_size=200, every=EVERY)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))

"""Reading the whole log in fuzz tests, waiting for events still becoming visible."""

from __future__ import annotations

import asyncio
import time

from eventmill import EventStore, StoredEvent

LOG_DEADLINE = 10.0
"""Seconds to wait for the log to show every published event (on PostgreSQL a read
shows an event only once every older transaction in the server has ended)."""


async def wait_for_log_length(store: EventStore, expected: int) -> list[StoredEvent]:
    """The log once it holds at least ``expected`` events (or at the deadline); the
    caller asserts the exact count."""
    deadline = time.monotonic() + LOG_DEADLINE
    while True:
        log = await store.log().read()
        if len(log) >= expected or time.monotonic() > deadline:
            assert len(log) == expected
            return log
        await asyncio.sleep(0.05)

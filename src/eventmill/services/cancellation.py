"""A guard against cancellations lost on the way.

Python 3.11's ``asyncio.wait_for`` (which psycopg's connection pool uses while waiting
for a connection) can swallow a cancellation that races a result. A loop that then
carries on would never stop. Loops call ``raise_if_cancelling()`` between iterations.
"""

from __future__ import annotations

import asyncio


def raise_if_cancelling() -> None:
    """Raise CancelledError if the current task was asked to cancel but is still running."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError

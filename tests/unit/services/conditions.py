"""Waiting on a condition with a deadline, for the services tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Return once ``condition()`` holds; fail the test if it does not within ``within`` s.

    Checks every millisecond: the conditions looked at here are set from other threads
    too, where an ``asyncio.Event`` cannot be used.
    """
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.001)

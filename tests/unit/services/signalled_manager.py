"""Child process for the signal tests: a ServiceManager with one service per isolation
mode that runs until SIGINT or SIGTERM. Prints "started X" once each service runs,
"cancelled X" when it sees its cancellation, and "stopped" at the end."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable

from eventmill.services import CallableService, IsolationMode, ServiceManager


def say(line: str) -> None:
    """One write per line, so that lines from different threads never interleave."""
    os.write(1, f"{line}\n".encode())


def announcing(name: str) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        say(f"started {name}")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            say(f"cancelled {name}")
            raise

    return run


async def main() -> None:
    manager = ServiceManager()
    for mode in IsolationMode:
        manager.register(
            CallableService(announcing(mode.name)), name=mode.name, isolation_mode=mode
        )
    manager.stop_on([signal.SIGINT, signal.SIGTERM])
    async with manager:
        await manager.wait()
    say("stopped")


if __name__ == "__main__":
    asyncio.run(main())

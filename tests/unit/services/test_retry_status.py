"""Health while retrying: an ErrorHandlingService retrying a failure reports ERRORED
until an execution succeeds, and a PollingService around it shows that."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from eventmill.errors import StorageError
from eventmill.services import (
    CallableService,
    ErrorHandlingService,
    PollingService,
    Process,
    ProcessStatus,
    RetryErrorHandler,
)

from .conditions import wait_until


def status(process: Process) -> ProcessStatus:
    """Read afresh (mypy would keep an earlier assert's narrowing)."""
    return process.status


class Flaky:
    """Fails while ``failing`` is set; each call waits for ``proceed``."""

    def __init__(self) -> None:
        self.failing = True
        self.calls = 0
        self.proceed = asyncio.Event()

    async def __call__(self) -> None:
        self.calls += 1
        await self.proceed.wait()
        self.proceed.clear()
        if self.failing:
            raise StorageError("down")


async def test_polling_reports_errored_from_a_failure_until_a_retry_succeeds() -> None:
    flaky = Flaky()
    retry: RetryErrorHandler[None] = RetryErrorHandler()
    handling = ErrorHandlingService(
        CallableService(flaky), retry, sleep=lambda _seconds: asyncio.sleep(0)
    )
    polling = PollingService(handling, timedelta(hours=1))
    task = asyncio.create_task(polling.execute())
    try:
        await wait_until(lambda: flaky.calls == 1)
        assert polling.status is ProcessStatus.RUNNING  # no failure yet
        flaky.proceed.set()
        await wait_until(lambda: flaky.calls == 2)
        assert handling.status is ProcessStatus.ERRORED
        assert status(polling) is ProcessStatus.ERRORED  # also during the retry itself
        flaky.failing = False
        flaky.proceed.set()
        await wait_until(lambda: polling.status is ProcessStatus.WAITING)
        assert status(handling) is ProcessStatus.WAITING
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

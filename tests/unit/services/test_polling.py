"""PollingService: repeats, waits, wakes (also from other threads) and stops promptly."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta

import pytest

from eventmill.errors import InvalidSettingsError
from eventmill.services import CallableService, PollingService, ProcessStatus

from .conditions import wait_until

LONG = timedelta(hours=1)


class Counter:
    def __init__(self) -> None:
        self.runs = 0
        self.ran = asyncio.Event()

    async def __call__(self) -> None:
        self.runs += 1
        self.ran.set()


async def test_repeats_after_each_interval() -> None:
    counter = Counter()
    polling = PollingService(CallableService(counter), timedelta(milliseconds=1))
    task = asyncio.create_task(polling.execute())
    await wait_until(lambda: counter.runs >= 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert polling.status == ProcessStatus.STOPPED


async def test_waits_the_interval_until_woken() -> None:
    counter = Counter()
    polling = PollingService(CallableService(counter), LONG)
    assert polling.status == ProcessStatus.INITIALISED
    task = asyncio.create_task(polling.execute())
    await wait_until(lambda: polling.status == ProcessStatus.WAITING)
    for _ in range(5):  # still one run: the interval is long
        await asyncio.sleep(0)
    assert counter.runs == 1
    polling.wake()
    await wait_until(lambda: counter.runs == 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_wake_during_a_run_is_not_lost() -> None:
    release = asyncio.Event()
    entered = asyncio.Event()
    runs = 0

    async def slow() -> None:
        nonlocal runs
        runs += 1
        entered.set()
        await release.wait()

    polling = PollingService(CallableService(slow), LONG)
    task = asyncio.create_task(polling.execute())
    await entered.wait()
    assert polling.status == ProcessStatus.RUNNING
    polling.wake()  # while the first run is still going
    release.set()
    await wait_until(lambda: runs == 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_wake_from_another_thread() -> None:
    counter = Counter()
    polling = PollingService(CallableService(counter), LONG)
    task = asyncio.create_task(polling.execute())
    await wait_until(lambda: polling.status == ProcessStatus.WAITING)
    thread = threading.Thread(target=polling.wake)
    thread.start()
    thread.join()
    await wait_until(lambda: counter.runs == 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_wake_before_start_does_nothing() -> None:
    PollingService(CallableService(Counter()), LONG).wake()


async def test_cancelled_promptly_while_running() -> None:
    entered = asyncio.Event()
    cancelled = False

    async def forever() -> None:
        nonlocal cancelled
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled = True
            raise

    task = asyncio.create_task(PollingService(CallableService(forever), LONG).execute())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled


async def test_an_exception_ends_polling() -> None:
    async def failing() -> None:
        raise ValueError("bad")

    polling = PollingService(CallableService(failing), LONG)
    with pytest.raises(ValueError, match="bad"):
        await polling.execute()
    assert polling.status == ProcessStatus.ERRORED


def test_negative_interval_is_refused() -> None:
    with pytest.raises(InvalidSettingsError):
        PollingService(CallableService(Counter()), timedelta(seconds=-1))


async def test_stops_when_the_service_swallowed_its_cancellation() -> None:
    """A cancellation lost inside the service (as Python 3.11's wait_for can lose one)
    still stops the poller once the service returns."""
    started = asyncio.Event()

    async def swallowing() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            return  # swallowed

    poller = PollingService(CallableService(swallowing), timedelta(milliseconds=1))
    task = asyncio.create_task(poller.execute())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(10):
            await task
    assert poller.status is ProcessStatus.STOPPED

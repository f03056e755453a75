"""PollingService: run a service, wait a poll interval or until woken, repeat."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from eventmill.errors import InvalidSettingsError, describe
from eventmill.services.cancellation import raise_if_cancelling
from eventmill.services.service import Service
from eventmill.services.status import Process, ProcessStatus


async def wait_until_woken(woken: asyncio.Event, seconds: float) -> None:
    """Return once ``woken`` is set or ``seconds`` have passed, whichever comes first."""
    if woken.is_set():
        return
    try:
        async with asyncio.timeout(seconds):
            await woken.wait()
    except TimeoutError:
        pass


class PollingService(Service[None]):
    """Runs ``service.execute()`` forever, waiting ``poll_interval`` between runs.

    ``wake()`` ends the current wait at once; a wake that arrives while the service is
    running is kept, so the wait after that run returns at once. Exceptions from the
    service end the polling (wrap it in an ``ErrorHandlingService`` to decide
    otherwise). Cancellation stops it promptly, also in the middle of a wait.
    """

    def __init__(self, service: Service[Any], poll_interval: timedelta) -> None:
        if not isinstance(poll_interval, timedelta) or poll_interval < timedelta(0):
            raise InvalidSettingsError(
                f"poll_interval must not be negative, got {describe(poll_interval)}"
            )
        self._service = service
        self._poll_interval = poll_interval
        self._status = ProcessStatus.INITIALISED
        self._loop: asyncio.AbstractEventLoop | None = None
        self._woken: asyncio.Event | None = None

    @property
    def service(self) -> Service[Any]:
        """The polled service."""
        return self._service

    @property
    def poll_interval(self) -> timedelta:
        """The wait between runs when nobody wakes the service."""
        return self._poll_interval

    @property
    def status(self) -> ProcessStatus:
        """RUNNING while the service runs (ERRORED when the service is a Process that
        reports ERRORED, e.g. an ErrorHandlingService retrying), WAITING between runs,
        STOPPED or ERRORED after."""
        if (
            self._status is ProcessStatus.RUNNING
            and isinstance(self._service, Process)
            and self._service.status is ProcessStatus.ERRORED
        ):
            return ProcessStatus.ERRORED
        return self._status

    def wake(self) -> None:
        """End the current wait (or the next one, if the service is running) early.

        Never blocks; safe to call from any thread. Does nothing before ``execute()``.
        """
        loop, woken = self._loop, self._woken
        if loop is None or woken is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            woken.set()
            return
        try:
            loop.call_soon_threadsafe(woken.set)
        except RuntimeError:
            return  # the loop is closed: polling is over

    async def execute(self) -> None:
        """Poll until cancelled; raises what the service raises."""
        self._loop = asyncio.get_running_loop()
        woken = self._woken = asyncio.Event()
        seconds = self._poll_interval.total_seconds()
        self._status = ProcessStatus.STARTING
        try:
            while True:
                raise_if_cancelling()
                woken.clear()
                self._status = ProcessStatus.RUNNING
                await self._service.execute()
                self._status = ProcessStatus.WAITING
                raise_if_cancelling()
                await wait_until_woken(woken, seconds)
        except asyncio.CancelledError:
            self._status = ProcessStatus.STOPPED
            raise
        except BaseException:
            self._status = ProcessStatus.ERRORED
            raise

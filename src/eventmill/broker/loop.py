"""BrokerLoop: the periodic loop shared by the subscriber manager, the coordinator and
the observer: one round, then a wait of one interval (or less, when woken or when the
round asks for it); a round that fails on storage makes it back off exponentially."""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from datetime import timedelta

from eventmill.errors import ConflictError, InvalidSettingsError, LifecycleError, StorageError
from eventmill.log_fields import one_line
from eventmill.services.cancellation import raise_if_cancelling
from eventmill.services.error_handlers import ExponentialBackoff
from eventmill.services.polling import wait_until_woken
from eventmill.services.service import Service
from eventmill.services.status import ProcessStatus

logger = logging.getLogger(__name__)

MAX_BACKOFF = timedelta(seconds=10)
"""The longest wait between two failed rounds."""


def check_interval(value: object, what: str) -> timedelta:
    """Return ``value`` if it is a positive timedelta; raise InvalidSettingsError."""
    if not isinstance(value, timedelta):
        raise InvalidSettingsError(f"{what} must be a timedelta, not {type(value).__name__}")
    if value <= timedelta(0):
        raise InvalidSettingsError(f"{what} must be positive, not {value}")
    return value


class BrokerLoop(Service[None], ABC):
    """Runs ``run_round()`` every ``interval`` until cancelled.

    A round that raises StorageError or ConflictError is logged (the first of a run of
    failures at WARNING, the rest at DEBUG, and "recovered after N s" at INFO when a
    round succeeds again); the loop then reports
    ERRORED (also during the rounds that retry) and waits ``interval`` doubled per
    consecutive failure (capped at 10 s, with jitter) before the next round, and
    recovers by itself after one that succeeds. Any other exception ends the loop.
    ``wake()`` starts the next round at once.
    """

    def __init__(self, interval: timedelta, *, what: str) -> None:
        self._interval = check_interval(interval, what)
        self._backoff = ExponentialBackoff(
            initial=min(interval, MAX_BACKOFF), maximum=max(interval, MAX_BACKOFF)
        )
        self._status = ProcessStatus.INITIALISED
        self._woken: asyncio.Event | None = None
        self._failures = 0
        self.last_error: Exception | None = None
        """The error of the latest failed round (None after a round that succeeded)."""
        self.rounds = 0
        """How many rounds succeeded."""
        self.last_round_at: float | None = None
        """``time.monotonic()`` at the start of the latest successful round."""
        self._waiters: list[asyncio.Future[None]] = []
        self._ended: BaseException | None = None

    @property
    def interval(self) -> timedelta:
        """The wait between rounds."""
        return self._interval

    @property
    def status(self) -> ProcessStatus:
        """RUNNING during a round, WAITING between rounds, ERRORED from a failed round
        until a round succeeds, STOPPED once cancelled."""
        return self._status

    def wake(self) -> None:
        """Start the next round now (or right after the running one). Never blocks;
        call it from the loop's thread."""
        if self._woken is not None:
            self._woken.set()

    async def wait_round(self, started_after: float) -> None:
        """Block until a round that started at ``time.monotonic()`` >= ``started_after``
        succeeded. Raises LifecycleError once the loop ended (the error that ended it,
        if any, is the cause)."""
        while self.last_round_at is None or self.last_round_at < started_after:
            if self._ended is not None:
                cause = None if isinstance(self._ended, asyncio.CancelledError) else self._ended
                raise LifecycleError(f"{self!r} has ended") from cause
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _notify_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    @abstractmethod
    async def run_round(self) -> timedelta | None:
        """One round; returns how long to wait before the next (None: ``interval``)."""

    async def execute(self) -> None:
        """Run rounds until cancelled; raises what a round raises other than
        StorageError or ConflictError."""
        woken = self._woken = asyncio.Event()
        self._status = ProcessStatus.STARTING
        failing_since = 0.0
        try:
            while True:
                raise_if_cancelling()
                woken.clear()
                started = time.monotonic()
                if not self._failures:
                    self._status = ProcessStatus.RUNNING
                try:
                    wait = await self.run_round()
                except (StorageError, ConflictError) as error:
                    self._failures += 1
                    if self._failures == 1:
                        failing_since = started
                    self.last_error = error
                    self._status = ProcessStatus.ERRORED
                    delay = self._backoff.delay(self._failures)
                    # One WARNING per failure episode; the retries at DEBUG.
                    (logger.warning if self._failures == 1 else logger.debug)(
                        "%r: round failed (%d in a row), retrying in %.2fs: %s",
                        self,
                        self._failures,
                        delay.total_seconds(),
                        one_line(error),
                    )
                    await asyncio.sleep(delay.total_seconds())
                    continue
                if self._failures:
                    logger.info(
                        "%r: recovered after %.1f s (%d failed rounds)",
                        self,
                        time.monotonic() - failing_since,
                        self._failures,
                    )
                self._failures = 0
                self.last_error = None
                self.rounds += 1
                self.last_round_at = started
                self._status = ProcessStatus.WAITING
                self._notify_waiters()
                seconds = (self._interval if wait is None else wait).total_seconds()
                raise_if_cancelling()
                await wait_until_woken(woken, seconds)
        except asyncio.CancelledError as cancelled:
            self._status = ProcessStatus.STOPPED
            self._ended = cancelled
            self._notify_waiters()
            raise
        except BaseException as error:
            self._status = ProcessStatus.ERRORED
            self._ended = error
            self._notify_waiters()
            raise

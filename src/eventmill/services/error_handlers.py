"""Error handling around services: decisions, handlers, retry backoff, ErrorHandlingService.

An ``ErrorHandler`` looks at an exception a service raised and returns a decision:

- ``RaiseDecision()``: re-raise the exception;
- ``ContinueDecision(value)``: swallow it; ``execute()`` returns ``value``;
- ``RetryDecision(after)``: run the service again, after waiting ``after`` if given;
- ``ExitDecision(code)``: ask for an orderly exit: ``ErrorHandlingService`` raises
  ``ExitRequestedError(code)``, which ``ServiceManager`` turns into a stop of every
  service followed by ``SystemExit(code)``.

Handlers only ever see ``Exception``s: ``asyncio.CancelledError``,
``KeyboardInterrupt`` and ``SystemExit`` always pass through untouched.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random as random_module
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, Never, TypeAlias, TypeVar, overload

from eventmill.errors import ExitRequestedError, InvalidSettingsError, describe
from eventmill.log_fields import one_line
from eventmill.services.service import Service
from eventmill.services.status import ProcessStatus

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

logger = logging.getLogger(__name__)

ExceptionTypes: TypeAlias = type[Exception] | tuple[type[Exception], ...]


@dataclass(frozen=True, slots=True)
class RaiseDecision:
    """Re-raise the exception."""


@dataclass(frozen=True, slots=True)
class ContinueDecision(Generic[T_co]):
    """Swallow the exception; the service's result is ``value``."""

    value: T_co


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """Run the service again, after waiting ``after`` (at once when None)."""

    after: timedelta | None = None


@dataclass(frozen=True, slots=True)
class ExitDecision:
    """Ask for an orderly exit of the process with exit ``code``."""

    code: int = 1


ErrorDecision: TypeAlias = RaiseDecision | ContinueDecision[T_co] | RetryDecision | ExitDecision


class ErrorHandler(ABC, Generic[T_co]):
    """Decides what to do about an exception raised by a service."""

    @abstractmethod
    def handle(self, exception: Exception, attempt: int = 1) -> ErrorDecision[T_co]:
        """The decision for ``exception``; never blocks.

        ``attempt`` counts the consecutive failures of the current ``execute()``
        including this one (1 for the first), so retry limits need no shared state.
        """


class RaiseErrorHandler(ErrorHandler[Never]):
    """Always re-raise."""

    def handle(self, exception: Exception, attempt: int = 1) -> ErrorDecision[Never]:
        """Always ``RaiseDecision()``."""
        return RaiseDecision()


class ExitErrorHandler(ErrorHandler[Never]):
    """Always ask for an orderly exit with ``code``."""

    def __init__(self, code: int = 1) -> None:
        self._code = code

    def handle(self, exception: Exception, attempt: int = 1) -> ErrorDecision[Never]:
        """Always ``ExitDecision(code)``."""
        logger.error("exiting with code %d after: %r", self._code, exception)
        return ExitDecision(self._code)


class ContinueErrorHandler(ErrorHandler[T_co]):
    """Always continue, with ``None`` or with ``value_factory(exception)``."""

    @overload
    def __init__(self: ContinueErrorHandler[None]) -> None: ...

    @overload
    def __init__(self, value_factory: Callable[[Exception], T_co]) -> None: ...

    def __init__(self, value_factory: Callable[[Exception], Any] | None = None) -> None:
        self._value_factory = value_factory

    def handle(self, exception: Exception, attempt: int = 1) -> ErrorDecision[T_co]:
        """Always ``ContinueDecision``; raises what ``value_factory`` raises."""
        logger.warning("continuing after: %r", exception)
        if self._value_factory is None:
            return ContinueDecision(None)  # type: ignore[arg-type]  # only for [None]
        value: T_co = self._value_factory(exception)
        return ContinueDecision(value)


class RetryBackoff(ABC):
    """How long to wait before each retry."""

    @abstractmethod
    def delay(self, attempt: int) -> timedelta:
        """The wait after failure number ``attempt`` (1 for the first)."""


class ConstantBackoff(RetryBackoff):
    """The same wait before every retry."""

    def __init__(self, wait: timedelta = timedelta(0)) -> None:
        if not isinstance(wait, timedelta) or wait < timedelta(0):
            raise InvalidSettingsError(f"wait must not be negative, got {describe(wait)}")
        self._wait = wait

    def delay(self, attempt: int) -> timedelta:
        """Always the configured wait."""
        return self._wait


class ExponentialBackoff(RetryBackoff):
    """Waits that grow by ``multiplier`` from ``initial``, capped at ``maximum``.

    With ``jitter`` j (0 to 1) each wait is shortened by a random fraction of up to j,
    so ``delay(n) = min(maximum, initial * multiplier ** (n - 1)) * (1 - j * random())``.
    ``random`` returns a float in [0, 1); inject it to make delays predictable.
    """

    def __init__(
        self,
        *,
        initial: timedelta = timedelta(milliseconds=100),
        maximum: timedelta = timedelta(seconds=30),
        multiplier: float = 2.0,
        jitter: float = 0.1,
        random: Callable[[], float] = random_module.random,
    ) -> None:
        if (
            not isinstance(initial, timedelta)
            or not isinstance(maximum, timedelta)
            or initial <= timedelta(0)
            or maximum < initial
        ):
            raise InvalidSettingsError("need timedeltas with 0 < initial <= maximum")
        if type(multiplier) not in (int, float) or not 1 <= multiplier < math.inf:
            raise InvalidSettingsError(
                f"multiplier must be a finite number >= 1, got {describe(multiplier)}"
            )
        if type(jitter) not in (int, float) or not 0 <= jitter <= 1:
            raise InvalidSettingsError(f"jitter must be between 0 and 1, got {describe(jitter)}")
        self._initial = initial
        self._maximum = maximum
        self._multiplier = multiplier
        self._jitter = jitter
        self._random = random

    def delay(self, attempt: int) -> timedelta:
        """The capped, jittered wait after failure number ``attempt``."""
        try:
            grown = self._initial * (self._multiplier ** (attempt - 1))
        except OverflowError:
            grown = self._maximum
        base = min(grown, self._maximum)
        return base * (1 - self._jitter * self._random())


class RetryErrorHandler(ErrorHandler[T_co]):
    """Retry with a backoff; give the exception to ``fallback`` when retrying is over.

    An exception is retried when it is an instance of ``retry_on`` and not of
    ``never_retry_on``, and fewer than ``max_attempts`` executions have failed (no
    limit when None). Otherwise ``fallback`` decides (re-raise by default).
    """

    def __init__(
        self,
        *,
        backoff: RetryBackoff | None = None,
        max_attempts: int | None = None,
        fallback: ErrorHandler[T_co] | None = None,
        retry_on: ExceptionTypes = Exception,
        never_retry_on: ExceptionTypes = (),
    ) -> None:
        if max_attempts is not None and (type(max_attempts) is not int or max_attempts < 1):
            raise InvalidSettingsError(
                f"max_attempts must be at least 1, got {describe(max_attempts)}"
            )
        self._backoff = backoff if backoff is not None else ExponentialBackoff()
        self._max_attempts = max_attempts
        self._fallback: ErrorHandler[T_co] = (
            fallback if fallback is not None else RaiseErrorHandler()
        )
        self._retry_on = retry_on
        self._never_retry_on = never_retry_on

    def handle(self, exception: Exception, attempt: int = 1) -> ErrorDecision[T_co]:
        """``RetryDecision`` with the backoff's delay, or the fallback's decision."""
        retryable = isinstance(exception, self._retry_on) and not isinstance(
            exception, self._never_retry_on
        )
        exhausted = self._max_attempts is not None and attempt >= self._max_attempts
        if not retryable or exhausted:
            return self._fallback.handle(exception, attempt)
        after = self._backoff.delay(attempt)
        # One WARNING per failure episode; the retries at DEBUG.
        (logger.warning if attempt == 1 else logger.debug)(
            "retrying in %s (failure %d): %s: %s",
            after,
            attempt,
            type(exception).__name__,
            one_line(exception),
        )
        return RetryDecision(after)


class TypeMappingErrorHandler(ErrorHandler[T_co]):
    """Chooses a handler by the exception's type.

    ``mapping`` is tried in order; the first entry whose type(s) the exception is an
    instance of decides. For an ``ExceptionGroup`` that no entry matches as a whole,
    the entries are tried in order against every exception inside it (nested groups
    included) and the first entry that matches one of them decides, given that inner
    exception. When nothing matches, ``default`` decides (re-raise by default).
    """

    def __init__(
        self,
        mapping: Mapping[ExceptionTypes, ErrorHandler[T_co]],
        *,
        default: ErrorHandler[T_co] | None = None,
    ) -> None:
        self._mapping = list(mapping.items())
        self._default: ErrorHandler[T_co] = default if default is not None else RaiseErrorHandler()

    def handle(self, exception: Exception, attempt: int = 1) -> ErrorDecision[T_co]:
        """The decision of the handler mapped to the exception's type."""
        for types, handler in self._mapping:
            if isinstance(exception, types):
                return handler.handle(exception, attempt)
        if isinstance(exception, ExceptionGroup):
            leaves = list(_leaves(exception))
            for types, handler in self._mapping:
                for leaf in leaves:
                    if isinstance(leaf, types):
                        return handler.handle(leaf, attempt)
        return self._default.handle(exception, attempt)


def _leaves(group: ExceptionGroup[Exception]) -> Iterator[Exception]:
    for inner in group.exceptions:
        if isinstance(inner, ExceptionGroup):
            yield from _leaves(inner)
        else:
            yield inner


class ErrorHandlingService(Service[T_co]):
    """Runs ``service`` and applies ``error_handler``'s decision to what it raises.

    ``sleep`` (seconds -> awaitable) waits before retries; inject it in tests.
    ``execute()`` returns the service's result or a ``ContinueDecision``'s value;
    raises the exception on ``RaiseDecision`` and ``ExitRequestedError`` on
    ``ExitDecision``. Cancellation passes through untouched. Its ``status`` is ERRORED
    from a failure it retries until an execution succeeds (a poller's health shows it).
    """

    def __init__(
        self,
        service: Service[T_co],
        error_handler: ErrorHandler[T_co],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._service = service
        self._error_handler = error_handler
        self._sleep = sleep
        self._retrying = False
        self._executing = False
        self.failures = 0
        """How many executions of the service raised, in total (for metrics)."""

    @property
    def service(self) -> Service[T_co]:
        """The wrapped service."""
        return self._service

    @property
    def status(self) -> ProcessStatus:
        """ERRORED while retrying after a failure (until an execution succeeds or the
        handler decides otherwise), RUNNING while executing, WAITING otherwise."""
        if self._retrying:
            return ProcessStatus.ERRORED
        return ProcessStatus.RUNNING if self._executing else ProcessStatus.WAITING

    async def execute(self) -> T_co:
        """Run the service, retrying as decided; blocks while it runs and between tries."""
        attempt = 0
        failing_since = 0.0
        self._executing = True
        try:
            while True:
                try:
                    result = await self._service.execute()
                except Exception as raised:
                    if attempt == 0:
                        failing_since = time.monotonic()
                    attempt += 1
                    self.failures += 1
                    exception = raised
                    decision = self._error_handler.handle(raised, attempt)
                else:
                    if attempt:
                        logger.info(
                            "recovered after %.1f s (%d failures)",
                            time.monotonic() - failing_since,
                            attempt,
                        )
                    return result
                if isinstance(decision, ContinueDecision):
                    return decision.value
                if isinstance(decision, RetryDecision):
                    self._retrying = True
                    if decision.after is not None and decision.after > timedelta(0):
                        await self._sleep(decision.after.total_seconds())
                    continue
                if isinstance(decision, ExitDecision):
                    raise ExitRequestedError(decision.code) from exception
                raise exception
        finally:
            self._executing = False
            self._retrying = False

"""Error handlers, decisions, retry backoff and ErrorHandlingService (no real time)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from eventmill.errors import ExitRequestedError, InvalidSettingsError
from eventmill.services import (
    CallableService,
    ConstantBackoff,
    ContinueDecision,
    ContinueErrorHandler,
    ErrorHandlingService,
    ExitDecision,
    ExitErrorHandler,
    ExponentialBackoff,
    RaiseDecision,
    RaiseErrorHandler,
    RetryDecision,
    RetryErrorHandler,
    Service,
    TypeMappingErrorHandler,
)


class Flaky(Service[str]):
    """Raises the given exceptions in turn, then returns "done"."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def execute(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "done"


class RecordingSleep:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def test_basic_handlers_decide() -> None:
    error = ValueError("x")
    assert RaiseErrorHandler().handle(error) == RaiseDecision()
    assert ExitErrorHandler(3).handle(error) == ExitDecision(3)
    assert ContinueErrorHandler().handle(error) == ContinueDecision(None)
    assert ContinueErrorHandler(lambda exception: str(exception)).handle(error) == (
        ContinueDecision("x")
    )


async def test_raise_decision_reraises_the_same_exception() -> None:
    error = ValueError("boom")
    service = ErrorHandlingService(Flaky(error), RaiseErrorHandler())
    with pytest.raises(ValueError, match="boom") as raised:
        await service.execute()
    assert raised.value is error


async def test_continue_decision_returns_the_value() -> None:
    service = ErrorHandlingService(
        Flaky(KeyError("k")), ContinueErrorHandler(lambda exception: f"skipped {exception}")
    )
    assert await service.execute() == "skipped 'k'"


async def test_exit_decision_raises_exit_requested_with_the_cause() -> None:
    error = RuntimeError("fatal")
    service = ErrorHandlingService(Flaky(error), ExitErrorHandler(7))
    with pytest.raises(ExitRequestedError) as raised:
        await service.execute()
    assert raised.value.code == 7
    assert raised.value.__cause__ is error


async def test_retry_decision_runs_again_until_success() -> None:
    flaky = Flaky(ValueError(), ValueError())
    sleep = RecordingSleep()
    handler = RetryErrorHandler[str](backoff=ConstantBackoff(timedelta(seconds=2)))
    assert await ErrorHandlingService(flaky, handler, sleep=sleep).execute() == "done"
    assert flaky.calls == 3
    assert sleep.waits == [2.0, 2.0]


async def test_retry_without_wait_does_not_sleep() -> None:
    flaky = Flaky(ValueError())
    sleep = RecordingSleep()
    assert (
        await ErrorHandlingService(
            flaky, RetryErrorHandler(backoff=ConstantBackoff()), sleep=sleep
        ).execute()
        == "done"
    )
    assert sleep.waits == []


async def test_exponential_backoff_grows_is_capped_and_stops_after_max_attempts() -> None:
    failures = [ValueError(str(number)) for number in range(10)]
    flaky = Flaky(*failures)
    sleep = RecordingSleep()
    handler = RetryErrorHandler[str](
        backoff=ExponentialBackoff(
            initial=timedelta(seconds=1),
            maximum=timedelta(seconds=5),
            multiplier=2,
            jitter=0.0,
        ),
        max_attempts=6,
    )
    with pytest.raises(ValueError, match="5") as raised:
        await ErrorHandlingService(flaky, handler, sleep=sleep).execute()
    assert raised.value is failures[5]
    assert flaky.calls == 6
    assert sleep.waits == [1.0, 2.0, 4.0, 5.0, 5.0]


async def test_attempts_are_counted_per_execute() -> None:
    flaky = Flaky(ValueError())
    handler = RetryErrorHandler[str](backoff=ConstantBackoff(), max_attempts=2)
    service = ErrorHandlingService(flaky, handler, sleep=RecordingSleep())
    assert await service.execute() == "done"  # failed once, then succeeded
    flaky.failures = [ValueError(), ValueError("second")]
    with pytest.raises(ValueError, match="second"):
        await service.execute()  # a fresh count: two failures allowed again


def test_jitter_shortens_waits_within_the_cap() -> None:
    draws = iter([0.0, 0.5, 0.999])
    backoff = ExponentialBackoff(
        initial=timedelta(seconds=4),
        maximum=timedelta(seconds=8),
        jitter=0.5,
        random=lambda: next(draws),
    )
    assert backoff.delay(1) == timedelta(seconds=4)
    assert backoff.delay(2) == timedelta(seconds=6)
    assert backoff.delay(3) == timedelta(seconds=8) * (1 - 0.5 * 0.999)


def test_huge_attempt_numbers_stay_at_the_cap() -> None:
    backoff = ExponentialBackoff(
        initial=timedelta(seconds=1), maximum=timedelta(minutes=1), jitter=0.0
    )
    assert backoff.delay(100_000) == timedelta(minutes=1)


def test_max_attempts_hands_over_to_the_fallback() -> None:
    handler = RetryErrorHandler(
        backoff=ConstantBackoff(), max_attempts=3, fallback=ExitErrorHandler(4)
    )
    error = ValueError()
    assert handler.handle(error, 1) == RetryDecision(timedelta(0))
    assert handler.handle(error, 2) == RetryDecision(timedelta(0))
    assert handler.handle(error, 3) == ExitDecision(4)


def test_retry_only_included_and_not_excluded_types() -> None:
    handler = RetryErrorHandler(
        backoff=ConstantBackoff(),
        retry_on=(OSError, ValueError),
        never_retry_on=FileNotFoundError,
        fallback=ContinueErrorHandler(),
    )
    assert handler.handle(ConnectionError()) == RetryDecision(timedelta(0))
    assert handler.handle(ValueError()) == RetryDecision(timedelta(0))
    assert handler.handle(FileNotFoundError()) == ContinueDecision(None)
    assert handler.handle(KeyError()) == ContinueDecision(None)


def test_type_mapping_picks_the_first_matching_entry() -> None:
    handler = TypeMappingErrorHandler(
        {
            KeyError: ContinueErrorHandler(lambda exception: "key"),
            (LookupError, ValueError): ContinueErrorHandler(lambda exception: "lookup"),
        },
        default=ExitErrorHandler(2),
    )
    assert handler.handle(KeyError()) == ContinueDecision("key")
    assert handler.handle(IndexError()) == ContinueDecision("lookup")
    assert handler.handle(ValueError()) == ContinueDecision("lookup")
    assert handler.handle(RuntimeError()) == ExitDecision(2)


def test_type_mapping_looks_inside_exception_groups() -> None:
    handler = TypeMappingErrorHandler(
        {
            KeyError: ContinueErrorHandler(lambda exception: f"key {exception}"),
            ValueError: ExitErrorHandler(5),
        }
    )
    nested = ExceptionGroup("outer", [RuntimeError(), ExceptionGroup("inner", [KeyError("k")])])
    assert handler.handle(nested) == ContinueDecision("key 'k'")
    both = ExceptionGroup("both", [ValueError(), KeyError("k")])
    assert handler.handle(both) == ContinueDecision("key 'k'")  # mapping order decides
    assert handler.handle(ExceptionGroup("none", [RuntimeError()])) == RaiseDecision()


def test_type_mapping_can_map_a_group_as_a_whole() -> None:
    handler = TypeMappingErrorHandler(
        {ExceptionGroup: ExitErrorHandler(9), KeyError: ContinueErrorHandler()}
    )
    assert handler.handle(ExceptionGroup("g", [KeyError()])) == ExitDecision(9)


@pytest.mark.parametrize("passing", [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(3)])
async def test_cancellation_and_interrupts_pass_through_untouched(
    passing: BaseException,
) -> None:
    seen: list[Exception] = []

    def record(exception: Exception) -> None:
        seen.append(exception)

    service = ErrorHandlingService(Flaky(passing), ContinueErrorHandler(record))
    with pytest.raises(type(passing)) as raised:
        await service.execute()
    assert raised.value is passing
    assert seen == []


async def test_cancelling_a_retry_wait_stops_the_service() -> None:
    started = asyncio.Event()

    async def failing() -> None:
        started.set()
        raise ValueError

    handler = RetryErrorHandler[None](backoff=ConstantBackoff(timedelta(hours=1)))
    task = asyncio.create_task(ErrorHandlingService(CallableService(failing), handler).execute())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize(
    "settings",
    [
        {"initial": timedelta(0)},
        {"initial": timedelta(seconds=2), "maximum": timedelta(seconds=1)},
        {"multiplier": 0.5},
        {"jitter": 1.5},
    ],
)
def test_bad_backoff_settings_are_refused(settings: dict[str, object]) -> None:
    with pytest.raises(InvalidSettingsError):
        ExponentialBackoff(**settings)  # type: ignore[arg-type]


def test_bad_retry_settings_are_refused() -> None:
    with pytest.raises(InvalidSettingsError):
        RetryErrorHandler(max_attempts=0)
    with pytest.raises(InvalidSettingsError):
        ConstantBackoff(timedelta(seconds=-1))

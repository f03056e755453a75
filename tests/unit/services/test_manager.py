"""ServiceManager: execution x isolation modes, failures from threads, stop, lifecycle."""

from __future__ import annotations

import asyncio
import signal
import threading
from datetime import timedelta

import pytest

from eventmill.errors import (
    ExitRequestedError,
    InvalidSettingsError,
    LifecycleError,
    StopTimeoutError,
)
from eventmill.services import (
    CallableService,
    ExecutionMode,
    IsolationMode,
    PollingService,
    ProcessStatus,
    Service,
    ServiceManager,
    combine_statuses,
)

from .conditions import wait_until

ISOLATION_MODES = list(IsolationMode)
EXECUTION_MODES = list(ExecutionMode)


class Recorder(Service[None]):
    """Records the thread it ran in; runs once, or until cancelled when ``forever``."""

    def __init__(self, *, forever: bool) -> None:
        self.forever = forever
        self.thread: int | None = None
        self.started = threading.Event()
        self.finished = threading.Event()
        self.cancelled = threading.Event()

    async def execute(self) -> None:
        self.thread = threading.get_ident()
        self.started.set()
        try:
            if self.forever:
                await asyncio.sleep(3600)
            else:
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        self.finished.set()


class Failing(Service[None]):
    """Raises ``exception``, once ``after`` (another service's start) is set if given."""

    def __init__(self, exception: BaseException, after: threading.Event | None = None) -> None:
        self.exception = exception
        self.after = after

    async def execute(self) -> None:
        if self.after is not None:
            await wait_until(self.after.is_set)
        raise self.exception


@pytest.mark.parametrize("isolation", ISOLATION_MODES)
@pytest.mark.parametrize("execution", EXECUTION_MODES)
async def test_each_mode_runs_where_it_should_and_start_waits_for_foreground(
    execution: ExecutionMode, isolation: IsolationMode
) -> None:
    threads_before = threading.active_count()
    foreground = execution is ExecutionMode.FOREGROUND
    first, second = Recorder(forever=not foreground), Recorder(forever=not foreground)
    manager = ServiceManager()
    manager.register(first, name="first", execution_mode=execution, isolation_mode=isolation)
    manager.register(second, name="second", execution_mode=execution, isolation_mode=isolation)
    async with manager:
        if foreground:
            assert first.finished.is_set()
            assert second.finished.is_set()
            assert manager.statuses == {
                "first": ProcessStatus.STOPPED,
                "second": ProcessStatus.STOPPED,
            }
        else:
            await wait_until(lambda: first.started.is_set() and second.started.is_set())
            await wait_until(lambda: manager.status == ProcessStatus.RUNNING)
            assert not first.finished.is_set()
    assert manager.status == ProcessStatus.STOPPED
    assert first.cancelled.is_set() is not foreground
    assert second.cancelled.is_set() is not foreground
    here = threading.get_ident()
    if isolation is IsolationMode.MAIN_THREAD:
        assert first.thread == second.thread == here
    elif isolation is IsolationMode.SHARED_THREAD:
        assert first.thread == second.thread != here
    else:
        assert len({first.thread, second.thread, here}) == 3
    assert threading.active_count() == threads_before


async def test_modes_can_be_mixed_in_one_manager() -> None:
    services = {
        (execution, isolation): Recorder(forever=execution is ExecutionMode.BACKGROUND)
        for execution in EXECUTION_MODES
        for isolation in ISOLATION_MODES
    }
    manager = ServiceManager()
    for (execution, isolation), service in services.items():
        manager.register(service, execution_mode=execution, isolation_mode=isolation)
    async with manager:
        for (execution, _), service in services.items():
            if execution is ExecutionMode.FOREGROUND:
                assert service.finished.is_set()
        await wait_until(lambda: all(service.started.is_set() for service in services.values()))
    for (execution, _), service in services.items():
        assert service.cancelled.is_set() is (execution is ExecutionMode.BACKGROUND)


@pytest.mark.parametrize("isolation", ISOLATION_MODES)
async def test_a_failing_background_service_surfaces_and_stops_the_others(
    isolation: IsolationMode,
) -> None:
    threads_before = threading.active_count()
    other = Recorder(forever=True)
    manager = ServiceManager()
    manager.register(other, isolation_mode=IsolationMode.DEDICATED_THREAD)
    manager.register(
        Failing(ValueError("bad"), other.started), name="failing", isolation_mode=isolation
    )
    with pytest.raises(ValueError, match="bad") as raised:
        async with manager, asyncio.timeout(10):  # the failure must end the wait
            await manager.wait()
    assert "raised by service 'failing'" in "".join(raised.value.__notes__)
    assert other.cancelled.is_set()
    assert manager.statuses["failing"] == ProcessStatus.ERRORED
    assert manager.status == ProcessStatus.ERRORED
    assert threading.active_count() == threads_before


@pytest.mark.parametrize("isolation", ISOLATION_MODES)
async def test_a_failing_foreground_service_surfaces_from_start(
    isolation: IsolationMode,
) -> None:
    other = Recorder(forever=True)
    manager = ServiceManager()
    manager.register(other, isolation_mode=IsolationMode.SHARED_THREAD)
    manager.register(
        Failing(KeyError("k"), other.started),
        execution_mode=ExecutionMode.FOREGROUND,
        isolation_mode=isolation,
    )
    with pytest.raises(KeyError):
        await manager.start()
    assert other.cancelled.is_set()
    await manager.stop()  # harmless after the failure stopped everything


async def test_a_background_failure_while_start_waits_for_foreground_surfaces_from_start() -> None:
    foreground = Recorder(forever=True)
    manager = ServiceManager()
    manager.register(foreground, execution_mode=ExecutionMode.FOREGROUND)
    manager.register(
        Failing(RuntimeError("background"), foreground.started),
        isolation_mode=IsolationMode.DEDICATED_THREAD,
    )
    with pytest.raises(RuntimeError, match="background"):
        await manager.start()
    assert foreground.cancelled.is_set()


async def test_a_failure_is_raised_once() -> None:
    manager = ServiceManager()
    manager.register(Failing(ValueError("once")), isolation_mode=IsolationMode.SHARED_THREAD)
    async with manager:
        with pytest.raises(ValueError, match="once"):
            await manager.wait()
    # __aexit__ did not raise it again


@pytest.mark.parametrize("isolation", ISOLATION_MODES)
async def test_exit_request_stops_everything_then_raises_system_exit(
    isolation: IsolationMode,
) -> None:
    other = Recorder(forever=True)
    manager = ServiceManager()
    manager.register(other, isolation_mode=IsolationMode.DEDICATED_THREAD)
    manager.register(Failing(ExitRequestedError(3), other.started), isolation_mode=isolation)
    with pytest.raises(SystemExit) as raised:
        async with manager, asyncio.timeout(10):  # the failure must end the wait
            await manager.wait()
    assert raised.value.code == 3
    assert isinstance(raised.value.__cause__, ExitRequestedError)
    assert other.cancelled.is_set()


@pytest.mark.parametrize("isolation", ISOLATION_MODES)
async def test_stop_during_a_long_await_returns_and_leaves_no_thread(
    isolation: IsolationMode,
) -> None:
    threads_before = threading.active_count()
    services = [Recorder(forever=True) for _ in range(3)]
    manager = ServiceManager(stop_timeout=timedelta(seconds=10))
    for service in services:
        manager.register(service, isolation_mode=isolation)
    await manager.start()
    await wait_until(lambda: all(service.started.is_set() for service in services))
    assert threading.active_count() > threads_before or isolation is IsolationMode.MAIN_THREAD
    await manager.stop()
    assert all(service.cancelled.is_set() for service in services)
    assert threading.active_count() == threads_before
    await manager.stop()  # twice is harmless
    await manager.wait()  # everything has ended


async def test_stop_gives_up_after_the_timeout_naming_the_stuck_service() -> None:
    release = threading.Event()
    refused = threading.Event()
    entered = threading.Event()

    async def stubborn() -> None:
        entered.set()
        while not release.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                refused.set()  # and keeps going: a buggy service

    threads_before = threading.active_count()
    manager = ServiceManager(stop_timeout=timedelta(milliseconds=200))
    manager.register(
        CallableService(stubborn), name="stubborn", isolation_mode=IsolationMode.DEDICATED_THREAD
    )
    await manager.start()
    await wait_until(entered.is_set)
    with pytest.raises(StopTimeoutError) as raised:
        await manager.stop()
    assert "stubborn" in raised.value.names
    assert refused.is_set()
    with pytest.raises(StopTimeoutError):
        await manager.wait()  # does not hang on the stuck service
    release.set()
    await wait_until(lambda: threading.active_count() == threads_before)


async def test_statuses_report_each_service_and_use_their_own_status() -> None:
    polled = asyncio.Event()

    async def poll() -> None:
        polled.set()

    manager = ServiceManager()
    manager.register(PollingService(CallableService(poll), timedelta(hours=1)), name="poller")
    manager.register(Recorder(forever=True), name="recorder")
    assert manager.statuses == {
        "poller": ProcessStatus.INITIALISED,
        "recorder": ProcessStatus.INITIALISED,
    }
    assert combine_statuses(manager.statuses.values()) == ProcessStatus.INITIALISED
    async with manager:
        await polled.wait()
        await wait_until(lambda: manager.statuses["poller"] == ProcessStatus.WAITING)
        await wait_until(lambda: manager.statuses["recorder"] == ProcessStatus.RUNNING)
        assert manager.status == ProcessStatus.RUNNING
    assert manager.statuses == {"poller": ProcessStatus.STOPPED, "recorder": ProcessStatus.STOPPED}


async def test_lifecycle_errors() -> None:
    manager = ServiceManager()
    with pytest.raises(LifecycleError):
        await manager.wait()
    await manager.stop()  # before start: nothing to do
    manager.register(Recorder(forever=False), name="one")
    with pytest.raises(InvalidSettingsError):
        manager.register(Recorder(forever=False), name="one")
    async with manager:
        with pytest.raises(LifecycleError):
            manager.register(Recorder(forever=False))
        with pytest.raises(LifecycleError):
            await manager.start()
    with pytest.raises(LifecycleError):
        await manager.start()


def test_generated_names_are_unique() -> None:
    manager = ServiceManager()
    names = {manager.register(Recorder(forever=False)) for _ in range(3)}
    assert names == {"Recorder-1", "Recorder-2", "Recorder-3"}


def test_stop_timeout_must_be_positive() -> None:
    with pytest.raises(InvalidSettingsError):
        ServiceManager(stop_timeout=timedelta(0))


async def test_cancelling_start_stops_the_services() -> None:
    background = Recorder(forever=True)
    foreground = Recorder(forever=True)
    manager = ServiceManager()
    manager.register(background, isolation_mode=IsolationMode.SHARED_THREAD)
    manager.register(foreground, execution_mode=ExecutionMode.FOREGROUND)
    starting = asyncio.create_task(manager.start())
    await wait_until(lambda: foreground.started.is_set() and background.started.is_set())
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert background.cancelled.is_set()
    assert foreground.cancelled.is_set()


async def test_signal_handlers_are_installed_while_running_and_removed_after() -> None:
    loop = asyncio.get_running_loop()
    manager = ServiceManager()
    manager.register(Recorder(forever=True))
    manager.stop_on([signal.SIGUSR1])
    async with manager:
        assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)
    assert not loop.remove_signal_handler(signal.SIGUSR1)  # nothing left installed


async def test_wait_returns_when_every_service_has_finished() -> None:
    empty = ServiceManager()
    async with empty:
        await empty.wait()
    finite = [Recorder(forever=False) for _ in ISOLATION_MODES]
    manager = ServiceManager()
    for service, isolation in zip(finite, ISOLATION_MODES, strict=True):
        manager.register(service, isolation_mode=isolation)
    async with manager:
        await manager.wait()
        assert all(service.finished.is_set() for service in finite)
        assert manager.status == ProcessStatus.STOPPED

"""ServiceManager: runs services on the caller's loop or in threads of their own, and
stops them all.

Rules it keeps:

- a failing service is never silent: the first exception any service raises (also in
  another thread) stops every other service and is raised by ``start()`` (while it
  waits for foreground services), ``wait()`` or ``__aexit__``, with a note naming the
  service; an ``ExitRequestedError`` is raised as ``SystemExit(code)`` instead, after
  the orderly stop;
- ``stop()`` cancels every service in every thread, waits for them for at most
  ``stop_timeout``, stops and closes the threads' loops and joins the threads; calling
  it again waits for the same stop;
- ``stop_on(signals)`` makes the first of those signals stop the manager; the handlers
  are removed when the stop finishes;
- a manager runs once: registering after ``start()``, or starting twice, raises
  ``LifecycleError``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Iterable
from datetime import timedelta
from enum import Enum
from types import TracebackType
from typing import Any, Self

from eventmill.errors import (
    ExitRequestedError,
    InvalidSettingsError,
    LifecycleError,
    StopTimeoutError,
    describe,
)
from eventmill.services.service import Service
from eventmill.services.status import Process, ProcessStatus, combine_statuses

logger = logging.getLogger(__name__)


class ExecutionMode(Enum):
    """Whether ``start()`` waits for a service to finish."""

    FOREGROUND = "foreground"
    """``start()`` returns only once the service has finished."""
    BACKGROUND = "background"
    """``start()`` returns once the service is launched; it runs until stopped."""


class IsolationMode(Enum):
    """Where a service runs."""

    MAIN_THREAD = "main_thread"
    """As a task on the loop that called ``start()``."""
    SHARED_THREAD = "shared_thread"
    """On one extra thread with its own loop, shared by every such service."""
    DEDICATED_THREAD = "dedicated_thread"
    """On a thread with its own loop, for this service alone."""


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's when uvloop is installed, asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _LoopThread:
    """A daemon thread running an event loop of its own until ``stop()``."""

    def __init__(self, name: str, owner: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self.ready: asyncio.Future[None] = owner.create_future()
        self.finished: asyncio.Future[None] = owner.create_future()
        self._owner = owner
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the loop to stop once its current callbacks ran; never blocks."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:
                return  # closed meanwhile

    def join(self) -> None:
        """Blocks until the thread ends; call once ``finished`` is resolved."""
        self._thread.join()

    def _main(self) -> None:
        try:
            loop = _new_event_loop()
        except BaseException as exception:
            self.error = exception
            self._notify(self.ready)
            self._notify(self.finished)
            raise
        asyncio.set_event_loop(loop)
        self.loop = loop
        try:
            self._notify(self.ready)
            loop.run_forever()
            leftovers = asyncio.all_tasks(loop)
            for task in leftovers:
                task.cancel()
            if leftovers:
                loop.run_until_complete(asyncio.wait(leftovers))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
            self._notify(self.finished)

    def _notify(self, future: asyncio.Future[None]) -> None:
        try:
            self._owner.call_soon_threadsafe(_resolve, future)
        except RuntimeError:
            return  # the owner's loop is closed: nobody is waiting


class _ServiceRun:
    """One registered service and the state of its run."""

    def __init__(
        self,
        name: str,
        service: Service[Any],
        execution_mode: ExecutionMode,
        isolation_mode: IsolationMode,
    ) -> None:
        self.name = name
        self.service = service
        self.execution_mode = execution_mode
        self.isolation_mode = isolation_mode
        self.state = ProcessStatus.INITIALISED
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[None] | None = None
        self.done: asyncio.Future[None] | None = None
        self.failure: BaseException | None = None
        self.stopping = False

    @property
    def ended(self) -> bool:
        return self.done is not None and self.done.done()

    @property
    def status(self) -> ProcessStatus:
        state = self.state
        if state in (ProcessStatus.STARTING, ProcessStatus.RUNNING) and self.stopping:
            return ProcessStatus.STOPPING
        if state is ProcessStatus.RUNNING and isinstance(self.service, Process):
            return self.service.status
        return state


class _Phase(Enum):
    NEW = "new"
    STARTED = "started"
    STOPPED = "stopped"


class ServiceManager:
    """Runs registered services and stops them; see the module docstring for its rules.

    ``stop_timeout`` bounds how long ``stop()`` waits for services and threads to end.
    Every method must be called from the loop that called ``start()``.
    """

    def __init__(self, *, stop_timeout: timedelta = timedelta(seconds=10)) -> None:
        if not isinstance(stop_timeout, timedelta) or stop_timeout <= timedelta(0):
            raise InvalidSettingsError(
                f"stop_timeout must be positive, got {describe(stop_timeout)}"
            )
        self._stop_timeout = stop_timeout
        self._runs: dict[str, _ServiceRun] = {}
        self._threads: list[_LoopThread] = []
        self._phase = _Phase.NEW
        self._owner: asyncio.AbstractEventLoop | None = None
        self._failure: tuple[str, BaseException] | None = None
        self._failed: asyncio.Future[None] | None = None
        self._over: asyncio.Future[None] | None = None
        self._failure_reported = False
        self._stop_task: asyncio.Task[None] | None = None
        self._signals: tuple[signal.Signals, ...] = ()
        self._installed_signals: list[signal.Signals] = []

    def register(
        self,
        service: Service[Any],
        *,
        name: str | None = None,
        execution_mode: ExecutionMode = ExecutionMode.BACKGROUND,
        isolation_mode: IsolationMode = IsolationMode.MAIN_THREAD,
    ) -> str:
        """Add ``service``; returns its name (generated from its type when not given).

        Raises LifecycleError after ``start()``, InvalidSettingsError for a name in use.
        """
        if self._phase is not _Phase.NEW:
            raise LifecycleError("services can only be registered before start()")
        if name is None:
            number = len(self._runs) + 1
            while f"{type(service).__name__}-{number}" in self._runs:
                number += 1
            name = f"{type(service).__name__}-{number}"
        elif name in self._runs:
            raise InvalidSettingsError(f"a service named {name!r} is already registered")
        self._runs[name] = _ServiceRun(name, service, execution_mode, isolation_mode)
        return name

    @property
    def statuses(self) -> dict[str, ProcessStatus]:
        """Each service's status by name."""
        return {name: run.status for name, run in self._runs.items()}

    @property
    def status(self) -> ProcessStatus:
        """The services' statuses combined by ``combine_statuses``."""
        return combine_statuses(run.status for run in self._runs.values())

    def stop_on(self, signals: Iterable[signal.Signals]) -> None:
        """Stop the manager (once) when one of ``signals`` arrives.

        Installs loop signal handlers from ``start()`` (at once if already started) and
        removes them when the stop finishes. Only works in the main thread.
        """
        self._signals = tuple(signals)
        if self._phase is _Phase.STARTED and self._stop_task is None:
            self._install_signal_handlers()

    async def start(self) -> None:
        """Launch every service; blocks until the FOREGROUND ones have finished.

        Raises LifecycleError when called twice, and the first failure of any service
        that fails meanwhile (after stopping all of them).
        """
        if self._phase is not _Phase.NEW:
            raise LifecycleError("a ServiceManager can only be started once")
        self._phase = _Phase.STARTED
        owner = self._owner = asyncio.get_running_loop()
        self._failed = owner.create_future()
        self._over = owner.create_future()
        for run in self._runs.values():
            run.done = owner.create_future()
        self._check_over()
        try:
            self._install_signal_handlers()
            await self._start_threads(owner)
            for run in self._runs.values():
                self._launch(run)
            await self._wait_for_foreground()
        except BaseException:
            await self.stop()
            raise
        if self._failure is not None:
            await self.stop()
            self._raise_failure()

    async def wait(self) -> None:
        """Blocks until every service has ended (or a stop gave up on them) and any stop
        has finished.

        Raises the first failure of a service (``SystemExit`` for an exit request) and
        LifecycleError before ``start()``.
        """
        if self._phase is _Phase.NEW:
            raise LifecycleError("wait() before start()")
        assert self._over is not None
        await asyncio.wait([self._over])
        if self._stop_task is not None:
            await asyncio.shield(self._stop_task)
        self._raise_failure()

    async def stop(self) -> None:
        """Cancel every service and wait for them and their threads to end.

        Blocks for at most ``stop_timeout``; raises StopTimeoutError naming what was
        still running then (their daemon threads are left behind). Does nothing before
        ``start()``; a second call waits for the first stop.
        """
        if self._phase is _Phase.NEW:
            return
        await asyncio.shield(self._begin_stop())

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()
        if exc is None:
            self._raise_failure()

    async def _start_threads(self, owner: asyncio.AbstractEventLoop) -> None:
        shared: _LoopThread | None = None
        for run in self._runs.values():
            if run.isolation_mode is IsolationMode.MAIN_THREAD:
                run.loop = owner
                continue
            if run.isolation_mode is IsolationMode.SHARED_THREAD:
                if shared is None:
                    shared = self._new_thread("eventmill-shared", owner)
                thread = shared
            else:
                thread = self._new_thread(f"eventmill-{run.name}", owner)
            await thread.ready
            if thread.loop is None:
                raise LifecycleError(f"thread {thread.name} could not start") from thread.error
            run.loop = thread.loop

    def _new_thread(self, name: str, owner: asyncio.AbstractEventLoop) -> _LoopThread:
        thread = _LoopThread(name, owner)
        self._threads.append(thread)
        thread.start()
        return thread

    def _launch(self, run: _ServiceRun) -> None:
        assert run.loop is not None
        run.state = ProcessStatus.STARTING
        run.loop.call_soon_threadsafe(self._create_task, run)

    def _create_task(self, run: _ServiceRun) -> None:
        """On the service's loop: run it in a task that reports its end to the owner."""
        assert run.loop is not None
        run.task = run.loop.create_task(self._execute(run), name=run.name)
        run.task.add_done_callback(lambda task: self._report(run, task))

    async def _execute(self, run: _ServiceRun) -> None:
        run.state = ProcessStatus.RUNNING
        try:
            await run.service.execute()
        except asyncio.CancelledError:
            raise
        except BaseException as exception:
            run.failure = exception  # handed to the owner's loop by _report

    def _report(self, run: _ServiceRun, task: asyncio.Task[None]) -> None:
        """On the service's loop, when its task is done."""
        failure = None if task.cancelled() else run.failure
        run.state = ProcessStatus.STOPPED if failure is None else ProcessStatus.ERRORED
        assert self._owner is not None
        try:
            self._owner.call_soon_threadsafe(self._ended, run, failure)
        except RuntimeError:
            logger.error("service %r ended after its manager's loop closed", run.name)

    def _ended(self, run: _ServiceRun, failure: BaseException | None) -> None:
        """On the owner's loop: a service ended, failing with ``failure`` if not None."""
        assert run.done is not None
        _resolve(run.done)
        self._check_over()
        if failure is None:
            return
        if self._failure is not None:
            logger.error("service %r also failed", run.name, exc_info=failure)
            return
        if not isinstance(failure, ExitRequestedError):
            failure.add_note(f"raised by service {run.name!r}; every service was stopped")
        self._failure = (run.name, failure)
        assert self._failed is not None
        _resolve(self._failed)
        self._begin_stop()

    def _check_over(self) -> None:
        """Resolve ``_over`` once every service has ended."""
        assert self._over is not None
        if all(run.ended for run in self._runs.values()):
            _resolve(self._over)

    async def _wait_for_foreground(self) -> None:
        assert self._failed is not None
        while self._failure is None:
            pending = [
                run.done
                for run in self._runs.values()
                if run.execution_mode is ExecutionMode.FOREGROUND
                and run.done is not None
                and not run.done.done()
            ]
            if not pending:
                return
            await asyncio.wait([*pending, self._failed], return_when=asyncio.FIRST_COMPLETED)

    def _begin_stop(self) -> asyncio.Task[None]:
        if self._stop_task is None:
            assert self._owner is not None
            self._stop_task = self._owner.create_task(self._shutdown(), name="stop services")
            self._stop_task.add_done_callback(_mark_retrieved)
        return self._stop_task

    async def _shutdown(self) -> None:
        assert self._owner is not None
        deadline = self._owner.time() + self._stop_timeout.total_seconds()

        def remaining() -> float:
            assert self._owner is not None
            return max(0.0, deadline - self._owner.time())

        try:
            for run in self._runs.values():
                self._cancel(run)
            pending = [run.done for run in self._runs.values() if run.done and not run.ended]
            if pending:
                await asyncio.wait(pending, timeout=remaining())
            for thread in self._threads:
                thread.stop()
            finishing = [thread.finished for thread in self._threads]
            if finishing:
                await asyncio.wait(finishing, timeout=remaining())
            for thread in self._threads:
                if thread.finished.done():
                    thread.join()
        finally:
            self._remove_signal_handlers()
            self._phase = _Phase.STOPPED
            assert self._over is not None
            _resolve(self._over)
        stuck = [run.name for run in self._runs.values() if not run.ended]
        stuck += [thread.name for thread in self._threads if not thread.finished.done()]
        if stuck:
            raise StopTimeoutError(stuck)

    def _cancel(self, run: _ServiceRun) -> None:
        if run.ended:
            return
        run.stopping = True
        if run.loop is None or run.state is ProcessStatus.INITIALISED:
            run.state = ProcessStatus.STOPPED  # never launched
            if run.done is not None:
                _resolve(run.done)
                self._check_over()
            return
        try:
            run.loop.call_soon_threadsafe(_cancel_task, run)
        except RuntimeError:
            return  # its loop is closed: the run is over

    def _raise_failure(self) -> None:
        if self._failure is None or self._failure_reported:
            return
        self._failure_reported = True
        failure = self._failure[1]
        if isinstance(failure, ExitRequestedError):
            raise SystemExit(failure.code) from failure
        raise failure

    def _install_signal_handlers(self) -> None:
        assert self._owner is not None
        for signal_number in self._signals:
            if signal_number not in self._installed_signals:
                self._owner.add_signal_handler(signal_number, self._on_signal, signal_number)
                self._installed_signals.append(signal_number)

    def _remove_signal_handlers(self) -> None:
        assert self._owner is not None
        for signal_number in self._installed_signals:
            self._owner.remove_signal_handler(signal_number)
        self._installed_signals.clear()

    def _on_signal(self, signal_number: signal.Signals) -> None:
        logger.info("received %s: stopping services", signal_number.name)
        self._begin_stop()


def _cancel_task(run: _ServiceRun) -> None:
    """On the service's loop: cancel its task (created earlier on the same loop)."""
    if run.task is not None:
        run.task.cancel()


def _mark_retrieved(task: asyncio.Task[None]) -> None:
    """Whoever awaits the stop sees its exception; nobody awaiting is no warning."""
    if not task.cancelled():
        task.exception()

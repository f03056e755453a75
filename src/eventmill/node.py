"""EventProcessingNode: one process taking part in event processing, wired in one place.

::

    node = EventProcessingNode(backend, mode=NodeMode.BOTH)
    node.register_subscriber(group="totals", source=CategoryIdentifier("orders"),
                             processor=totals)
    async with node:                       # returns once ready
        await node.wait_caught_up(timeout=timedelta(seconds=10))

Each registered subscriber is an ``EventSubscriptionConsumer`` run by a
``PollingService`` (woken early by publish notifications) around an
``ErrorHandlingService``, in a ``ServiceManager`` of its own (so subscribers can come
and go while the node runs, each in its isolation mode), and registered with the
node's ``EventBroker``, which decides which sources it holds.

Graceful stop, in this order and within ``shutdown_timeout``: each subscriber stops
taking new work, finishes its in-flight batch and saves its checkpoint, and is then
unregistered (its record removed, so its sources move at once); then the polling
services stop; then the broker (releasing leadership). A component that gives up
makes ``run()`` (and ``async with``) raise its exception after that same stop.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any, Self

from eventmill.backends.base import Backend
from eventmill.backends.memory import InMemoryBackend
from eventmill.broker.base import EventBroker
from eventmill.broker.distributed import (
    DistributedEventBroker,
    DistributedEventBrokerSettings,
    default_node_id,
)
from eventmill.broker.singleton import SingletonEventBroker
from eventmill.consumers.failures import FailurePolicy, check_failure_policy
from eventmill.consumers.processors import Processor, TransactionalEventProcessor
from eventmill.consumers.subscription_consumer import (
    EventSubscriber,
    EventSubscriptionConsumer,
    make_subscriber,
)
from eventmill.errors import (
    CatchUpTimeoutError,
    ConflictError,
    InvalidInputError,
    InvalidSettingsError,
    LifecycleError,
    StorageError,
)
from eventmill.events import EventSourceIdentifier, StreamIdentifier, check_name
from eventmill.log_fields import CURRENT_NODE
from eventmill.rebuilds import ProjectionKeeper, Setup, check_projection, versioned_group
from eventmill.services.error_handlers import (
    ErrorHandler,
    ErrorHandlingService,
    RetryErrorHandler,
    TypeMappingErrorHandler,
)
from eventmill.services.manager import IsolationMode, ServiceManager
from eventmill.services.polling import PollingService
from eventmill.services.service import Service
from eventmill.services.status import ProcessStatus, combine_statuses
from eventmill.sources import EventSource
from eventmill.store import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, check_page_size

logger = logging.getLogger(__name__)


class NodeMode(enum.Enum):
    """Which parts of the broker a node runs: COORDINATOR (the coordinator and node
    liveness, no subscribers), OBSERVER (local subscribers), BOTH."""

    COORDINATOR = "coordinator"
    """Subscriber manager and coordinator; no local subscribers."""
    OBSERVER = "observer"
    """Subscriber manager and observer: runs subscribers, never coordinates."""
    BOTH = "both"
    """Everything: coordinates when it holds the lock, and runs subscribers."""


def default_error_handler() -> ErrorHandler[Any]:
    """Retry storage failures and lost checkpoint races with exponential backoff (0.1 s
    doubling up to 30 s, for ever); re-raise anything else (a processor's bug stops
    the node, loudly)."""
    retry: ErrorHandler[Any] = RetryErrorHandler()
    return TypeMappingErrorHandler({(StorageError, ConflictError): retry})


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeSettings:
    """Node-wide settings; the first four are defaults each ``register_subscriber`` call
    may override.

    - ``poll_interval``: the wait between passes when no publish wakes a subscriber;
    - ``checkpoint_interval``: a checkpoint is saved after this many processed events
      (and at the end of every pass); twice this is the most events replayed after a
      crash (a save commits while the next events are processed);
    - ``error_handler``: decides about a failed pass (default: ``default_error_handler()``);
    - ``isolation_mode``: where a subscriber's passes run (MAIN_THREAD: on the node's loop);
    - ``shutdown_timeout``: how long a graceful stop waits for in-flight batches;
    - ``page_size``: events read per query;
    - ``distributed``: use the distributed broker (True), the singleton one (False) or
      choose (None: singleton on an ``InMemoryBackend`` in BOTH mode, distributed
      otherwise). Several nodes sharing one storage need the distributed broker;
    - ``broker_settings``: the distributed broker's intervals (None: its defaults);
    - ``failure_policy``: what a subscriber does when its processor raises on an event
      (a default ``register_subscriber`` may override): retry, then park the stream,
      skip the event, stop the group or stop the node (``consumers.failures``).
    """

    poll_interval: timedelta = timedelta(seconds=1)
    checkpoint_interval: int = 100
    error_handler: ErrorHandler[Any] | None = None
    isolation_mode: IsolationMode = IsolationMode.MAIN_THREAD
    shutdown_timeout: timedelta = timedelta(seconds=10)
    page_size: int = DEFAULT_PAGE_SIZE
    distributed: bool | None = None
    broker_settings: DistributedEventBrokerSettings | None = None
    failure_policy: FailurePolicy = field(default_factory=FailurePolicy)

    def __post_init__(self) -> None:
        check_poll_interval(self.poll_interval)
        check_checkpoint_interval(self.checkpoint_interval)
        check_error_handler(self.error_handler)
        check_isolation_mode(self.isolation_mode)
        if not isinstance(self.shutdown_timeout, timedelta) or self.shutdown_timeout <= timedelta(
            0
        ):
            raise InvalidSettingsError(
                f"shutdown_timeout must be a positive timedelta, not {self.shutdown_timeout!r}"
            )
        try:
            check_page_size(self.page_size)
        except InvalidInputError as error:
            raise InvalidSettingsError(str(error)) from None
        if self.distributed not in (None, True, False):
            raise InvalidSettingsError(f"distributed must be a bool or None: {self.distributed!r}")
        if self.broker_settings is not None and not isinstance(
            self.broker_settings, DistributedEventBrokerSettings
        ):
            raise InvalidSettingsError(
                f"broker_settings must be DistributedEventBrokerSettings: {self.broker_settings!r}"
            )
        check_failure_policy(self.failure_policy)


def check_poll_interval(value: object) -> timedelta:
    """``value`` if it is a non-negative timedelta; raise InvalidSettingsError."""
    if not isinstance(value, timedelta) or value < timedelta(0):
        raise InvalidSettingsError(f"poll_interval must be a timedelta >= 0, not {value!r:.80}")
    return value


def check_checkpoint_interval(value: object) -> int:
    """``value`` if it is an int from 1 to 10,000; raise InvalidSettingsError."""
    if type(value) is not int or not 1 <= value <= 10_000:
        raise InvalidSettingsError(
            f"checkpoint_interval must be an int from 1 to 10000 (events), not {value!r:.80}"
        )
    return value


def check_error_handler(value: object) -> ErrorHandler[Any] | None:
    """``value`` if it is None or an ErrorHandler; raise InvalidSettingsError."""
    if value is not None and not isinstance(value, ErrorHandler):
        raise InvalidSettingsError(f"error_handler must be an ErrorHandler, not {value!r:.80}")
    return value


def check_isolation_mode(value: object) -> IsolationMode:
    """``value`` if it is an IsolationMode; raise InvalidSettingsError."""
    if not isinstance(value, IsolationMode):
        raise InvalidSettingsError(f"isolation_mode must be an IsolationMode, not {value!r:.80}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceStatistics:
    """One held source: its epoch, the place of the last processed event (None before
    the first), the place of the latest event readable now, and ``lag``: how many
    committed events are left, counted without reading them (exact, uncapped, and
    including any a reader waits for behind an open publish)."""

    source: EventSourceIdentifier
    epoch: int
    processed: int | None
    latest: int | None
    lag: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriberStatistics:
    """One local subscriber: its group, id, status and the sources it holds."""

    group: str
    id: str
    status: ProcessStatus
    sources: tuple[SourceStatistics, ...]
    parked: int = 0
    """Streams parked in the held sources (as of their last passes)."""

    @property
    def lag(self) -> int:
        """Events left over every held source."""
        return sum(source.lag for source in self.sources)


class _SubscriberPasses(Service[int]):
    """One pass of a subscriber per ``execute()``, skipped while the broker's view is
    not current; tells ``on_loop`` which loop the passes run on (first pass)."""

    def __init__(
        self,
        subscriber: EventSubscriptionConsumer,
        may_process: Callable[[], bool],
    ) -> None:
        self._subscriber = subscriber
        self._may_process = may_process
        self.on_loop: Callable[[asyncio.AbstractEventLoop], None] | None = None
        self.events_processed = 0
        """Events processed by the passes that finished (for metrics)."""
        self.on_pass: Callable[[float, int], None] | None = None
        """Called after each pass that finished with its duration (s) and event count."""
        self.on_drained: Callable[[], None] | None = None
        """Called after each pass that processed events (it read to the end of its
        sources): a versioned projection's keeper checks for its cutover then."""

    async def execute(self) -> int:
        if self.on_loop is not None:
            self.on_loop(asyncio.get_running_loop())
            self.on_loop = None
        if not self._may_process():
            return 0
        started = time.perf_counter()
        count = await self._subscriber.consume_all()
        self.events_processed += count
        if self.on_pass is not None:
            self.on_pass(time.perf_counter() - started, count)
        if count and self.on_drained is not None:
            self.on_drained()
        return count


class _LoopBoundSubscriber:
    """The subscriber as the broker sees it: ``accept``/``withdraw`` run on the loop of
    the subscriber's passes (another thread's, in thread isolation)."""

    def __init__(self, subscriber: EventSubscriptionConsumer) -> None:
        self.subscriber = subscriber
        self._owner = asyncio.get_running_loop()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bound = asyncio.Event()

    @property
    def group(self) -> str:
        return self.subscriber.group

    @property
    def id(self) -> str:
        return self.subscriber.id

    @property
    def subscription_requests(self) -> Sequence[EventSourceIdentifier]:
        return self.subscriber.subscription_requests

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called on the passes' loop, once."""
        self._loop = loop
        self._owner.call_soon_threadsafe(self._bound.set)

    async def accept(self, source: EventSourceIdentifier, epoch: int) -> None:
        await self._bound.wait()
        assert self._loop is not None
        if self._loop is self._owner:
            await self.subscriber.accept(source, epoch)
            return
        future = asyncio.run_coroutine_threadsafe(self.subscriber.accept(source, epoch), self._loop)
        await asyncio.wrap_future(future)

    async def withdraw(self, source: EventSourceIdentifier) -> None:
        if self._loop is None or self._loop is self._owner:
            await self.subscriber.withdraw(source)
            return
        future = asyncio.run_coroutine_threadsafe(self.subscriber.withdraw(source), self._loop)
        await asyncio.wrap_future(future)

    async def take_dropped(self) -> dict[EventSourceIdentifier, int]:
        if self._loop is None or self._loop is self._owner:
            return await self.subscriber.take_dropped()
        future = asyncio.run_coroutine_threadsafe(self.subscriber.take_dropped(), self._loop)
        return await asyncio.wrap_future(future)

    def health(self) -> ProcessStatus:
        return self.subscriber.health()


class SubscriberHandle:
    """What ``register_subscriber`` returns: the subscriber and how to remove it."""

    def __init__(
        self,
        node: EventProcessingNode,
        subscriber: EventSubscriptionConsumer,
        passes: _SubscriberPasses,
        polling: PollingService,
        isolation_mode: IsolationMode,
    ) -> None:
        self.node = node
        self.subscriber = subscriber
        self.passes = passes
        self.polling = polling
        self.isolation_mode = isolation_mode
        self.manager: ServiceManager | None = None
        self.registered: EventSubscriber | None = None
        self.started: asyncio.Task[None] | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.removed = False
        self.keeper: ProjectionKeeper | None = None
        """The upkeep of a versioned projection (``register_projection``), else None."""
        self.keeping: asyncio.Task[None] | None = None

    @property
    def group(self) -> str:
        """The subscriber group."""
        return self.subscriber.group

    @property
    def id(self) -> str:
        """The subscriber's id (unique in its group)."""
        return self.subscriber.id

    @property
    def status(self) -> ProcessStatus:
        """The status of its polling service (INITIALISED before the node runs), but
        ERRORED once its failure policy stopped it and DEGRADED while it holds back
        work (a parked stream or an event waiting for another try)."""
        if self.manager is None:
            return ProcessStatus.INITIALISED
        status = self.manager.status
        if status in (ProcessStatus.WAITING, ProcessStatus.RUNNING):
            own = self.subscriber.health()
            if own in (ProcessStatus.DEGRADED, ProcessStatus.ERRORED):
                return own
        return status

    async def remove(self) -> None:
        """Stop and unregister the subscriber: its in-flight batch finishes and its
        checkpoint is saved, then its sources move to the rest of its group. Blocks
        for that (at most the node's shutdown timeout); harmless when done already."""
        await self.node._remove(self)

    def __repr__(self) -> str:
        return f"<SubscriberHandle {self.group}/{self.id} {self.status}>"


class _Phase(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class EventProcessingNode:
    """A node: a broker plus the subscribers registered on it; see the module docstring.

    ``node_id`` defaults to ``hostname-pid-shortuuid``. Construction does no I/O and
    starts nothing. A node runs once: ``run()`` or ``async with`` a second time raises
    LifecycleError.
    """

    def __init__(
        self,
        backend: Backend,
        mode: NodeMode = NodeMode.BOTH,
        node_id: str | None = None,
        settings: NodeSettings | None = None,
    ) -> None:
        if not isinstance(backend, Backend):
            raise InvalidInputError(f"a node needs a Backend, not {backend!r:.80}")
        if not isinstance(mode, NodeMode):
            raise InvalidSettingsError(f"mode must be a NodeMode, not {mode!r:.80}")
        if settings is not None and not isinstance(settings, NodeSettings):
            raise InvalidSettingsError(f"settings must be NodeSettings, not {settings!r:.80}")
        self.backend = backend
        self.mode = mode
        self.node_id = check_name(node_id if node_id is not None else default_node_id(), "node id")
        self.settings = settings or NodeSettings()
        distributed = self.settings.distributed
        if distributed is None:
            distributed = not (isinstance(backend, InMemoryBackend) and mode is NodeMode.BOTH)
        if not distributed and mode is not NodeMode.BOTH:
            raise InvalidSettingsError(f"a {mode.name} node needs the distributed broker")
        self.broker: EventBroker = (
            DistributedEventBroker(
                backend,
                node_id=self.node_id,
                settings=self.settings.broker_settings,
                coordinate=mode is not NodeMode.OBSERVER,
                observe=mode is not NodeMode.COORDINATOR,
            )
            if distributed
            else SingletonEventBroker(backend, node_id=self.node_id)
        )
        self._handles: list[SubscriberHandle] = []
        self._phase = _Phase.NEW
        self._ready = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._failures: list[BaseException] = []
        self._stopped = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    # --- subscribers ---------------------------------------------------------------

    def register_subscriber(
        self,
        *,
        group: str,
        source: EventSourceIdentifier | Sequence[EventSourceIdentifier],
        processor: Processor,
        error_handler: ErrorHandler[Any] | None = None,
        poll_interval: timedelta | None = None,
        checkpoint_interval: int | None = None,
        isolation_mode: IsolationMode | None = None,
        id: str | None = None,
        partitions: int | None = None,
        reset_repartitioned: bool = False,
        failure_policy: FailurePolicy | None = None,
    ) -> SubscriberHandle:
        """Add a subscriber of ``group`` asking for ``source`` (one identifier or a
        list), feeding what it is given to ``processor``; the other arguments override
        the node's settings. ``id`` defaults to ``group@node_id``; ``partitions=N``
        asks for each category as its N partitions (see ``make_subscriber``), so the
        group's instances can share one category; a changed N is refused at
        registration (PartitioningChangedError) unless ``reset_repartitioned``
        processes the category again from the start (see ``eventmill.partitions``);
        ``failure_policy``: see ``NodeSettings``. Before ``run()`` it starts with the
        node; while the node runs it starts at once (``wait_ready()`` waits for it).

        Raises InvalidInputError / InvalidSettingsError for bad arguments (nothing is
        registered then), InvalidSettingsError on a COORDINATOR node, LifecycleError
        once the node is stopping or stopped.
        """
        if self.mode is NodeMode.COORDINATOR:
            raise InvalidSettingsError(
                "a COORDINATOR node runs no subscribers: register them on an OBSERVER or BOTH node"
            )
        if self._phase in (_Phase.STOPPING, _Phase.STOPPED):
            raise LifecycleError("the node is stopping or stopped: it takes no subscribers")
        settings = self.settings
        interval = check_poll_interval(
            settings.poll_interval if poll_interval is None else poll_interval
        )
        every = check_checkpoint_interval(
            settings.checkpoint_interval if checkpoint_interval is None else checkpoint_interval
        )
        handler = check_error_handler(
            settings.error_handler if error_handler is None else error_handler
        )
        isolation = check_isolation_mode(
            settings.isolation_mode if isolation_mode is None else isolation_mode
        )
        policy = check_failure_policy(
            settings.failure_policy if failure_policy is None else failure_policy
        )
        group = check_name(group, "group")
        if id is None:
            taken = {h.id for h in self._handles if h.group == group}
            id = f"{group}@{self.node_id}"
            number = 1
            while id in taken:
                number += 1
                id = f"{group}@{self.node_id}#{number}"
        elif any(h.group == group and h.id == id for h in self._handles if not h.removed):
            raise InvalidInputError(f"subscriber {id!r} of group {group!r} is already registered")
        subscriber = make_subscriber(
            self.backend,
            group=group,
            sources=source,
            processor=processor,
            id=id,
            checkpoint_every=every,
            page_size=settings.page_size,
            partitions=partitions,
            reset_repartitioned=reset_repartitioned,
            failure_policy=policy,
        )
        passes = _SubscriberPasses(subscriber, self._may_process)
        polling = PollingService(
            ErrorHandlingService(
                passes, handler if handler is not None else default_error_handler()
            ),
            interval,
        )
        subscriber.on_new_events(polling.wake)
        handle = SubscriberHandle(self, subscriber, passes, polling, isolation)
        self._handles.append(handle)
        if self._phase is _Phase.RUNNING:
            handle.started = asyncio.get_running_loop().create_task(self._start(handle))
        return handle

    def register_projection(
        self,
        *,
        name: str,
        version: int,
        source: EventSourceIdentifier | Sequence[EventSourceIdentifier],
        processor: TransactionalEventProcessor,
        setup: Setup | None = None,
        partitions: int | None = None,
        checkpoint_interval: int | None = None,
        cutover_lag: int = 100,
        retire_grace: timedelta = timedelta(minutes=10),
        check_interval: timedelta = timedelta(seconds=1),
    ) -> SubscriberHandle:
        """Register ``version`` of the versioned projection ``name``: the subscriber
        group ``name-vN`` builds it with ``processor`` (after ``setup`` created its
        tables) while the serving version keeps serving; once at most ``cutover_lag``
        events behind it takes over the read alias, and the version it replaced is
        dropped ``retire_grace`` later. A node registering a version a newer one
        replaced does not run it. ``checkpoint_interval`` is also the size of the
        transactional batches: larger ones rebuild faster. See ``eventmill.rebuilds``.
        Raises as ``register_subscriber`` does."""
        if not isinstance(processor, TransactionalEventProcessor):
            raise InvalidInputError(
                f"a versioned projection needs a TransactionalEventProcessor: {processor!r:.80}"
            )
        name, version = check_projection(name, version)
        handle = self.register_subscriber(
            group=versioned_group(name, version),
            source=source,
            processor=processor,
            partitions=partitions,
            checkpoint_interval=checkpoint_interval,
        )
        handle.keeper = ProjectionKeeper(
            self.backend,
            name=name,
            version=version,
            sources=handle.subscriber.subscription_requests,
            setup=setup,
            cutover_lag=cutover_lag,
            retire_grace=retire_grace,
            check_interval=check_interval,
        )
        handle.passes.on_drained = handle.keeper.wake
        return handle

    async def _keep(self, handle: SubscriberHandle, keeper: ProjectionKeeper) -> None:
        try:
            await keeper.run()
        except Exception as failure:  # a bug: fail the node like any component
            self._fail(failure)
            raise
        await self._remove(handle)  # replaced by a newer version

    @property
    def subscribers(self) -> list[SubscriberHandle]:
        """The registered subscribers (not removed), in registration order."""
        return [handle for handle in self._handles if not handle.removed]

    def _may_process(self) -> bool:
        broker = self.broker
        return not isinstance(broker, DistributedEventBroker) or broker.is_current

    async def _start(self, handle: SubscriberHandle) -> None:
        """Start the handle's polling (in its isolation) and register it with the
        broker; a failure is reported to ``run()`` and raised."""
        try:
            if handle.keeper is not None and not await handle.keeper.prepare():
                handle.removed = True  # a newer version of the projection serves
                return
            registered: EventSubscriber = handle.subscriber
            if handle.isolation_mode is not IsolationMode.MAIN_THREAD:
                bound = _LoopBoundSubscriber(handle.subscriber)
                handle.passes.on_loop = bound.bind
                registered = bound
                if isinstance(self.broker, DistributedEventBroker):  # it sees only `bound`
                    handle.subscriber.lease = self.broker.manager.lease
            manager = ServiceManager(stop_timeout=self.settings.shutdown_timeout)
            manager.register(handle.polling, name=handle.id, isolation_mode=handle.isolation_mode)
            handle.manager = manager
            await manager.start()
            handle.watcher = asyncio.get_running_loop().create_task(self._watch(manager))
            await self.broker.register(registered)
            handle.registered = registered
            if handle.keeper is not None:
                handle.keeping = asyncio.get_running_loop().create_task(
                    self._keep(handle, handle.keeper)
                )
        except BaseException as failure:
            self._fail(failure)
            raise

    async def _watch(self, manager: ServiceManager) -> None:
        try:
            await manager.wait()
        except BaseException as failure:
            self._fail(failure)
            raise

    def _fail(self, failure: BaseException) -> None:
        if not isinstance(failure, asyncio.CancelledError) and all(
            failure is not known for known in self._failures
        ):
            self._failures.append(failure)
            self._wakeup.set()

    async def _remove(self, handle: SubscriberHandle) -> None:
        if handle.removed:
            return
        handle.removed = True
        if handle.started is not None:
            await asyncio.wait([handle.started])  # a failure is reported by run()
        await self._stop_subscriber(handle)

    async def _stop_subscriber(self, handle: SubscriberHandle) -> None:
        """Unregister (withdraw: batches finish, checkpoints saved; record removed),
        then stop the polling."""
        if handle.keeping is not None and handle.keeping is not asyncio.current_task():
            handle.keeping.cancel()
        if handle.registered is not None:
            try:
                async with asyncio.timeout(self.settings.shutdown_timeout.total_seconds()):
                    await self.broker.unregister(handle.registered)
            except TimeoutError:
                logger.error("%s/%s: unregistering timed out", handle.group, handle.id)
            handle.registered = None
        if handle.manager is not None:
            await handle.manager.stop()
        if handle.watcher is not None:
            handle.watcher.cancel()
            await asyncio.wait([handle.watcher])  # a failure is reported by _watch

    # --- lifecycle -----------------------------------------------------------------

    async def run(self) -> None:
        """Run until ``stop()`` or cancellation, then stop gracefully.

        Raises LifecycleError when the node ran before, SchemaError (before starting
        anything) when the storage's schema is missing or not at this code's version,
        and the first failure of any component (broker or subscriber) after stopping
        the rest gracefully.
        """
        if self._phase is not _Phase.NEW:
            raise LifecycleError("a node runs only once")
        self._phase = _Phase.RUNNING
        CURRENT_NODE.set(self.node_id)  # this task's log records, and its children's
        try:
            await self.backend.check_schema()
        except BaseException:
            self._phase = _Phase.STOPPED
            self._stopped.set()
            raise
        loop = asyncio.get_running_loop()
        broker_task = loop.create_task(self._run_broker(), name=f"broker of {self.node_id}")
        try:
            try:
                for handle in self._handles:
                    handle.started = loop.create_task(self._start(handle))
                await self._become_ready()
                await self._wakeup.wait()
            finally:
                await asyncio.shield(self._shutdown(broker_task))
        finally:
            self._phase = _Phase.STOPPED
            self._stopped.set()
        if self._failures:
            for other in self._failures[1:]:
                logger.error("node %s: another component failed too", self.node_id, exc_info=other)
            raise self._failures[0]

    async def _run_broker(self) -> None:
        try:
            await self.broker.execute()
        except BaseException as failure:
            self._fail(failure)
            raise

    async def _become_ready(self) -> None:
        waiting = [h.started for h in self._handles if h.started is not None]
        waiter = asyncio.ensure_future(self._wait_started_and_broker(waiting))
        wakeup = asyncio.ensure_future(self._wakeup.wait())
        try:
            await asyncio.wait([waiter, wakeup], return_when=asyncio.FIRST_COMPLETED)
        finally:
            wakeup.cancel()
        if not waiter.done():
            waiter.cancel()
            await asyncio.wait([waiter])
        elif waiter.cancelled():
            return
        elif (failure := waiter.exception()) is not None:
            self._fail(failure)
        else:
            self._ready.set()

    async def _wait_started_and_broker(self, started: list[asyncio.Task[None]]) -> None:
        for task in started:
            await task
        await self.broker.wait_ready()

    async def _shutdown(self, broker_task: asyncio.Task[None]) -> None:
        self._phase = _Phase.STOPPING
        self._wakeup.set()
        for handle in self._handles:
            if handle.started is not None:
                handle.started.cancel()  # no-op when it finished
                await asyncio.wait([handle.started])  # a failure is reported by _start
        try:
            async with asyncio.TaskGroup() as group:
                for handle in self._handles:
                    if not handle.removed:
                        group.create_task(self._stop_subscriber(handle))
        except BaseExceptionGroup as failures:
            for failure in failures.exceptions:
                self._fail(failure)
        broker_task.cancel()
        await asyncio.wait([broker_task])  # a failure is reported by _run_broker
        if isinstance(self.broker, DistributedEventBroker):
            try:  # status stops listing this node at once
                async with asyncio.timeout(self.settings.shutdown_timeout.total_seconds()):
                    await self.backend.nodes.remove(self.node_id)
            except (TimeoutError, StorageError, LifecycleError) as error:
                logger.warning("node %s: could not remove its record: %r", self.node_id, error)

    @property
    def alive(self) -> bool:
        """Whether the node runs and no component has failed (a broker backing off
        from a storage failure still counts as alive: it recovers by itself)."""
        return self._phase is _Phase.RUNNING and not self._failures

    @property
    def ready(self) -> bool:
        """Whether the node is alive, got ready, and its broker's view is current."""
        return self.alive and self._ready.is_set() and self._may_process()

    def stop(self) -> None:
        """Ask a running node to stop gracefully (``run()`` returns when done). Never
        blocks; does nothing before ``run()`` and when stopping or stopped already."""
        if self._phase is _Phase.RUNNING:
            self._wakeup.set()

    async def wait_stopped(self) -> None:
        """Block until ``run()`` has finished its stop."""
        await self._stopped.wait()

    async def wait_ready(self) -> None:
        """Block until the node runs, every subscriber registered so far is started and
        registered, and the broker applied an allocation that saw them.

        Raises LifecycleError when the node stopped before it was ready.
        """
        ready = asyncio.ensure_future(self._ready.wait())
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait([ready, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            stopped.cancel()
        if self._phase is not _Phase.RUNNING:
            raise LifecycleError("the node is not running")
        for handle in self._handles:
            if handle.started is not None and not handle.removed:
                await handle.started
        await self.broker.wait_ready()

    async def wait_caught_up(self, timeout: timedelta | float = timedelta(seconds=30)) -> None:  # noqa: ASYNC109
        """Block until every local subscriber has processed every event that was
        visible, when this was called, in the sources it held then (a source that moved
        to another node meanwhile counts as done there).

        Raises CatchUpTimeoutError after ``timeout``, LifecycleError when not running,
        StorageError.
        """
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
        deadline = time.monotonic() + seconds
        try:
            async with asyncio.timeout(seconds):
                await self.wait_ready()
        except TimeoutError:
            raise CatchUpTimeoutError(f"the node was not ready within {seconds:g} s") from None
        targets: list[tuple[EventSourceIdentifier, str, int]] = []
        for handle in self.subscribers:
            for source in handle.subscriber.sources:
                latest = await EventSource(self.backend, source).latest()
                if latest is not None:
                    place = latest.position if isinstance(source, StreamIdentifier) else None
                    targets.append(
                        (source, handle.group, latest.sequence_number if place is None else place)
                    )
        for handle in self.subscribers:
            handle.polling.wake()
        while True:
            behind = [t for t in targets if not self._caught_up(*t)]
            if not behind:
                return
            if self._phase is not _Phase.RUNNING:
                raise LifecycleError("the node stopped before it caught up")
            if time.monotonic() >= deadline:
                source, group, place = behind[0]
                raise CatchUpTimeoutError(
                    f"{len(behind)} sources not caught up within {seconds:g} s, e.g. "
                    f"{group} in {source} (up to {place})"
                )
            await asyncio.sleep(0.01)

    def _caught_up(self, source: EventSourceIdentifier, group: str, place: int) -> bool:
        holders = [
            h.subscriber.consumer_of(source)
            for h in self.subscribers
            if h.group == group and source in h.subscriber.sources
        ]
        if not holders:
            return True  # moved to another node
        return any(
            c is not None and c.processed is not None and c.processed >= place for c in holders
        )

    async def __aenter__(self) -> Self:
        """Start ``run()`` in a task and return once the node is ready. Raises what
        made it fail to get ready (after stopping it), LifecycleError if it ran before."""
        if self._phase is not _Phase.NEW:
            raise LifecycleError("a node runs only once")
        self._runner = asyncio.get_running_loop().create_task(
            self.run(), name=f"node {self.node_id}"
        )
        ready = asyncio.ensure_future(self._ready.wait())
        try:
            await asyncio.wait([ready, self._runner], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if self._runner.done():
            await self._runner  # raises its failure
            raise LifecycleError("the node stopped before it was ready")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop gracefully; raise a component's failure unless the block raised."""
        self.stop()
        runner = self._runner
        assert runner is not None
        try:
            await asyncio.shield(runner)
        except Exception:
            if exc is None:
                raise
            logger.exception("node %s failed while the block raised", self.node_id)

    # --- observation ---------------------------------------------------------------

    def health(self) -> Mapping[str, ProcessStatus]:
        """Each component's status: ``broker`` and ``subscriber <group>/<id>``."""
        statuses = {"broker": self.broker.status}
        for handle in self.subscribers:
            statuses[f"subscriber {handle.group}/{handle.id}"] = handle.status
        return statuses

    @property
    def status(self) -> ProcessStatus:
        """The node's status: every component's combined, STOPPING/STOPPED while and
        after it stops, ERRORED once a component failed."""
        if self._failures:
            return ProcessStatus.ERRORED
        if self._phase is _Phase.STOPPED:
            return ProcessStatus.STOPPED
        if self._phase is _Phase.STOPPING:
            return ProcessStatus.STOPPING
        if self._phase is _Phase.NEW:
            return ProcessStatus.INITIALISED
        if not self._ready.is_set():
            return ProcessStatus.STARTING
        return combine_statuses(self.health().values())

    async def statistics(self) -> list[SubscriberStatistics]:
        """Per local subscriber: its sources, epochs, processed and latest places and
        lag in events. Raises StorageError."""
        result = []
        for handle in self.subscribers:
            subscriber = handle.subscriber
            sources = []
            for source, epoch in sorted(subscriber.sources.items(), key=lambda i: str(i[0])):
                consumer = subscriber.consumer_of(source)
                processed = None if consumer is None else consumer.processed
                reader = EventSource(self.backend, source, page_size=MAX_PAGE_SIZE)
                latest_event = await reader.latest()
                latest = None if latest_event is None else reader.place(latest_event)
                (counted,) = await self.backend.events.lags([(source, processed, None)])
                lag = counted.events
                sources.append(
                    SourceStatistics(
                        source=source, epoch=epoch, processed=processed, latest=latest, lag=lag
                    )
                )
            result.append(
                SubscriberStatistics(
                    group=handle.group,
                    id=handle.id,
                    status=handle.status,
                    sources=tuple(sources),
                    parked=len(subscriber.parked),
                )
            )
        return result

    def __repr__(self) -> str:
        return f"<EventProcessingNode {self.node_id} {self.mode.name} {self.status}>"

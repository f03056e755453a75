"""DistributedEventBroker: subscriber manager + coordinator + observer, for many nodes
sharing one storage (PostgreSQL).

Failover budget with the default settings (heartbeat 1 s, max age 5 s, distribution
and observer synchronisation 0.5 s):

- graceful stop: the stopping node withdraws and releases its sources and removes its
  subscribers; the leader assigns them in its next round (<= 0.5 s) and the new
  holders' observers accept them in theirs (<= 0.5 s): processing resumes within
  about one second (half of it on average);
- a killed or cut-off node: its subscribers are declared dead once their last
  heartbeat is older than the max age (4-5 s after the kill), then as above:
  about max age + distribution interval + synchronisation interval = 6 s (each loop
  waits its interval after its round, so a little more: measured 5.9-6.4 s);
- a killed leader: the lock dies with its connection, a standby takes it within a
  distribution interval, then the dead node's sources move as above.

A frozen node (SIGSTOP, a long GC or network pause) is declared dead the same way; its
sources' checkpoints are fenced at the new epoch before anyone is given them, so when
it wakes it cannot save a checkpoint of them, and ``is_current`` stays False until its
observer has caught up (a consumer loop should skip passes meanwhile). A frozen
*leader* holds the coordinator lock under a lease of the max age: on PostgreSQL the
server ends its idle lock session after that long, a standby takes the lock within a
distribution interval, and the woken ex-leader confirms the lock before it writes
anything, so it stops coordinating (budget as for a killed node).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

from eventmill.backends.base import Backend
from eventmill.broker.base import EventBroker
from eventmill.broker.coordinator import COORDINATOR_LOCK, EventSubscriptionCoordinator
from eventmill.broker.loop import BrokerLoop, check_interval
from eventmill.broker.observer import EventSubscriptionObserver
from eventmill.broker.singleton import SingletonEventBroker
from eventmill.broker.subscriber_manager import EventSubscriberManager
from eventmill.consumers.subscription_consumer import EventSubscriber
from eventmill.errors import InvalidInputError, InvalidSettingsError, LifecycleError
from eventmill.events import check_name
from eventmill.services.status import ProcessStatus, combine_statuses


@dataclass(frozen=True, slots=True, kw_only=True)
class DistributedEventBrokerSettings:
    """Timing of a DistributedEventBroker (see the module docstring for the failover
    budget these give). Every value is a positive timedelta; the max age must exceed
    the heartbeat interval. Raises InvalidSettingsError otherwise."""

    subscriber_manager_heartbeat_interval: timedelta = timedelta(seconds=1)
    """How often each local subscriber's record is refreshed."""
    subscriber_manager_purge_interval: timedelta = timedelta(seconds=5)
    """How often records older than the max age are deleted."""
    subscriber_manager_subscriber_max_age: timedelta = timedelta(seconds=5)
    """A subscriber not heard of for longer is dead: its sources move."""
    coordinator_distribution_interval: timedelta = timedelta(milliseconds=500)
    """How often the leader allocates (a standby also tries the lock this often)."""
    coordinator_leadership_max_duration: timedelta = timedelta(minutes=15)
    """The leader gives the lock up after this long, so leadership rotates."""
    observer_synchronisation_interval: timedelta = timedelta(milliseconds=500)
    """How often each node applies the holdings of its subscribers."""

    def __post_init__(self) -> None:
        for name in self.__slots__:
            check_interval(getattr(self, name), name)
        if self.subscriber_manager_subscriber_max_age <= self.subscriber_manager_heartbeat_interval:
            raise InvalidSettingsError(
                "subscriber_manager_subscriber_max_age must exceed the heartbeat interval"
            )


def default_node_id() -> str:
    """``hostname-pid-shortuuid``."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class DistributedEventBroker(EventBroker):
    """This node's part of the distributed broker.

    ``coordinate``: run the coordinator (it leads while it holds the lock);
    ``observe``: run the observer, needed to hold subscribers. The subscriber manager
    always runs. Construction does no I/O. Each part retries storage failures with a
    capped exponential backoff, reporting ERRORED meanwhile.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        node_id: str | None = None,
        settings: DistributedEventBrokerSettings | None = None,
        coordinate: bool = True,
        observe: bool = True,
        lock_name: str = COORDINATOR_LOCK,
    ) -> None:
        if not isinstance(backend, Backend):
            raise InvalidInputError(f"a broker needs a Backend, not {backend!r:.80}")
        if not coordinate and not observe:
            raise InvalidSettingsError("a broker must coordinate, observe or both")
        self.settings = settings or DistributedEventBrokerSettings()
        if not isinstance(self.settings, DistributedEventBrokerSettings):
            raise InvalidSettingsError(f"not DistributedEventBrokerSettings: {settings!r:.80}")
        self.node_id = check_name(node_id or default_node_id(), "node id")
        s = self.settings
        max_age = s.subscriber_manager_subscriber_max_age
        self.coordinator = (
            EventSubscriptionCoordinator(
                backend,
                distribution_interval=s.coordinator_distribution_interval,
                leadership_max_duration=s.coordinator_leadership_max_duration,
                subscriber_max_age=max_age,
                lock_name=lock_name,
            )
            if coordinate
            else None
        )
        self.observer = (
            EventSubscriptionObserver(
                backend,
                self.node_id,
                synchronisation_interval=s.observer_synchronisation_interval,
                subscriber_max_age=max_age,
            )
            if observe
            else None
        )
        self.manager = EventSubscriberManager(
            backend,
            self.node_id,
            heartbeat_interval=s.subscriber_manager_heartbeat_interval,
            purge_interval=s.subscriber_manager_purge_interval,
            subscriber_max_age=max_age,
            on_membership_change=self._membership_changed,
            mode="both" if coordinate and observe else "coordinator" if coordinate else "observer",
            leader_term=self._leader_term,
        )
        if self.observer is not None:  # the observer's rounds confirm the manager's lease
            self.observer.lease = self.manager.lease
        self._started = False

    @property
    def parts(self) -> list[BrokerLoop]:
        """The loops this broker runs."""
        return [part for part in (self.manager, self.coordinator, self.observer) if part]

    @property
    def status(self) -> ProcessStatus:
        """The combined status of the parts (ERRORED while one backs off)."""
        return combine_statuses(part.status for part in self.parts)

    @property
    def is_current(self) -> bool:
        """Whether this node's view of its holdings is recent enough to process by
        (always True without an observer): see ``EventSubscriptionObserver.is_current``."""
        return self.observer is None or self.observer.is_current

    @property
    def is_leader(self) -> bool:
        """Whether this node coordinates now."""
        return self.coordinator is not None and self.coordinator.is_leader

    def _leader_term(self) -> int | None:
        return self.coordinator.terms if self.is_leader and self.coordinator else None

    async def register(self, subscriber: EventSubscriber) -> None:
        """Record ``subscriber`` alive; the leader will give it sources. Raises
        InvalidInputError (no observer here, or the id is taken), StorageError."""
        if self.observer is None:
            raise InvalidInputError("a broker that does not observe cannot hold subscribers")
        self.observer.add(subscriber)
        try:
            await self.manager.register(subscriber)
        except BaseException:
            await self.observer.remove(subscriber)
            raise

    async def unregister(self, subscriber: EventSubscriber) -> None:
        """Withdraw and release the subscriber's sources, then delete its record.
        Harmless if unknown; raises StorageError."""
        if self.observer is not None:
            await self.observer.remove(subscriber)
        await self.manager.unregister(subscriber)

    async def wait_ready(self) -> None:
        """Block until, after this call, a coordinator round (if coordinating) and then
        an observer round (if observing) succeeded; each is woken to run now rather
        than after its interval (a node's start and every ``wait_caught_up`` waited up
        to 0.5 s for each). Raises LifecycleError once stopped."""
        if self.coordinator is not None:
            asked = time.monotonic()
            self.coordinator.wake()
            await self.coordinator.wait_round(asked)
        if self.observer is not None:
            asked = time.monotonic()
            self.observer.wake()
            await self.observer.wait_round(asked)

    async def execute(self) -> None:
        """Run every part until cancelled (the coordinator lock is released on the
        way out; nothing is withdrawn: unregister the subscribers first). Raises
        LifecycleError when run twice, and what ends a part."""
        if self._started:
            raise LifecycleError("a broker runs only once")
        self._started = True
        async with asyncio.TaskGroup() as group:
            for part in self.parts:
                group.create_task(part.execute())

    def _membership_changed(self) -> None:
        if self.coordinator is not None:
            self.coordinator.wake()
        if self.observer is not None:
            self.observer.wake()

    def __repr__(self) -> str:
        return f"<DistributedEventBroker {self.node_id} {self.status}>"


def make_event_broker(
    backend: Backend,
    *,
    distributed: bool,
    node_id: str | None = None,
    settings: DistributedEventBrokerSettings | None = None,
    coordinate: bool = True,
    observe: bool = True,
) -> EventBroker:
    """A DistributedEventBroker (``distributed``) or a SingletonEventBroker (one process,
    which takes no settings). Raises InvalidSettingsError for bad combinations."""
    if distributed:
        return DistributedEventBroker(
            backend, node_id=node_id, settings=settings, coordinate=coordinate, observe=observe
        )
    if settings is not None or not (coordinate and observe):
        raise InvalidSettingsError("a singleton broker takes no distributed settings or roles")
    return SingletonEventBroker(backend, node_id=node_id or "singleton")

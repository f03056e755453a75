"""EventSubscriberManager: tells the shared subscriber state that this node's
subscribers are alive, and forgets dead ones.

Heartbeats are sent on time even when the database is slow: a round sends its
heartbeat and does not wait for it, so up to ``MAX_HEARTBEATS_IN_FLIGHT`` are under way
at once and each renews the ownership lease when it succeeds. The lease then stays
valid while a heartbeat takes less than the lease minus the heartbeat interval (2 s
with the default 1 s and 5 s); one at a time, a slow heartbeat also delayed the next
one and the lease lapsed from half that.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import timedelta

from eventmill.backends.base import Backend
from eventmill.broker.loop import BrokerLoop, check_interval
from eventmill.consumers.lease import OwnershipLease, lease_margin
from eventmill.consumers.subscription_consumer import EventSubscriber, EventSubscriptionConsumer
from eventmill.errors import InvalidInputError
from eventmill.events import EventSourceIdentifier, check_name

MAX_HEARTBEATS_IN_FLIGHT = 2
"""How many heartbeats a node has under way at most (a round waits for the oldest
beyond that)."""


class EventSubscriberManager(BrokerLoop):
    """Registers this node's subscribers, heartbeats them every ``heartbeat_interval``
    (which re-creates a record purged while the node was away) without waiting for the
    previous heartbeat to finish, purges dead records (see ``SubscriberStateStore.purge``)
    every ``purge_interval``, and removes its own records when unregistering (so their
    sources move at once). A heartbeat that failed makes the next round raise its error.

    Each heartbeat also refreshes the node's own record (``backend.nodes``): its
    ``mode`` and, from ``leader_term``, the term it leads in (None: not leading); node
    records not seen for 12 max ages are purged.

    ``on_membership_change`` (if given) is called after a register or unregister.
    """

    def __init__(
        self,
        backend: Backend,
        node_id: str,
        *,
        heartbeat_interval: timedelta = timedelta(seconds=1),
        purge_interval: timedelta = timedelta(seconds=5),
        subscriber_max_age: timedelta = timedelta(seconds=5),
        on_membership_change: Callable[[], None] | None = None,
        mode: str = "observer",
        leader_term: Callable[[], int | None] | None = None,
    ) -> None:
        super().__init__(heartbeat_interval, what="subscriber_manager_heartbeat_interval")
        self._backend = backend
        self.node_id = check_name(node_id, "node id")
        self._purge_interval = check_interval(purge_interval, "subscriber_manager_purge_interval")
        self._max_age = check_interval(subscriber_max_age, "subscriber_manager_subscriber_max_age")
        self._on_change = on_membership_change
        self.mode = mode
        self._leader_term = leader_term
        self._subscribers: dict[tuple[str, str], EventSubscriber] = {}
        self._next_purge = 0.0
        self._in_flight: deque[asyncio.Task[None]] = deque()
        self._chores: dict[str, asyncio.Task[None]] = {}
        """The node's own heartbeat and the purge, when under way (one of each)."""
        margin = lease_margin(self._interval, self._max_age)
        self.lease = OwnershipLease(self._max_age - margin, margin=margin)
        """Renewed by each successful heartbeat; given to every EventSubscriptionConsumer
        registered here (see ``eventmill.consumers.lease``)."""

    @property
    def subscribers(self) -> list[EventSubscriber]:
        """The registered local subscribers."""
        return list(self._subscribers.values())

    async def register(self, subscriber: EventSubscriber) -> None:
        """Add ``subscriber`` and record it alive now. Raises InvalidInputError when
        another subscriber of the group has this id here, PartitioningChangedError when
        it partitions a category otherwise than the group's checkpoints, StorageError."""
        key = (subscriber.group, subscriber.id)
        known = self._subscribers.get(key)
        if known is not None and known is not subscriber:
            raise InvalidInputError(f"subscriber {key[1]!r} of {key[0]!r} is already registered")
        if isinstance(subscriber, EventSubscriptionConsumer):
            subscriber.lease = self.lease
            await subscriber.check_partitioning()
        await self._backend.subscribers.register(
            subscriber.group, subscriber.id, self.node_id, subscriber.subscription_requests
        )
        self._subscribers[key] = subscriber
        if self._on_change is not None:
            self._on_change()

    async def unregister(self, subscriber: EventSubscriber) -> None:
        """Forget ``subscriber`` and delete its record, once the heartbeats under way
        ended (so none re-creates it). Harmless if not registered; raises StorageError."""
        key = (subscriber.group, subscriber.id)
        if self._subscribers.get(key) is not subscriber:
            return
        del self._subscribers[key]
        if self._in_flight:
            await asyncio.wait(list(self._in_flight))
        await self._backend.subscribers.remove(subscriber.group, subscriber.id)
        if self._on_change is not None:
            self._on_change()

    async def run_round(self) -> timedelta | None:
        """Send a heartbeat of every local subscriber (one ``heartbeat_all``), not
        waited for unless ``MAX_HEARTBEATS_IN_FLIGHT`` are under way; start the node's
        heartbeat and, when due, the purge, each unless its previous one is still under
        way; after a failed round, waits for them all. Raises StorageError (the error of a
        heartbeat or purge started earlier)."""
        started = time.monotonic()
        self._reap()
        while len(self._in_flight) >= MAX_HEARTBEATS_IN_FLIGHT:
            await asyncio.wait([self._in_flight[0]])
            self._reap()
        entries = [(s.group, s.id, s.subscription_requests) for s in self._subscribers.values()]
        self._in_flight.append(asyncio.create_task(self._heartbeat(entries, started)))
        if "node" not in self._chores:
            term = None if self._leader_term is None else self._leader_term()
            self._chores["node"] = asyncio.create_task(
                self._backend.nodes.heartbeat(self.node_id, self.mode, leader_term=term)
            )
        if started >= self._next_purge and "purge" not in self._chores:
            self._chores["purge"] = asyncio.create_task(self._purge())
            self._next_purge = started + self._purge_interval.total_seconds()
        if self._failures:
            # While failing, a round succeeds only once its own writes do, so an outage
            # is one failure episode (one WARNING, one "recovered" line), not a round
            # that fails and one that "recovers" by starting work in turn.
            await asyncio.wait([*self._in_flight, *self._chores.values()])
            self._reap()
        return None

    async def _heartbeat(
        self, entries: Sequence[tuple[str, str, Sequence[EventSourceIdentifier]]], sent_at: float
    ) -> None:
        await self._backend.subscribers.heartbeat_all(self.node_id, entries)
        self.lease.renewed(sent_at)

    async def _purge(self) -> None:
        await self._backend.subscribers.purge(self._max_age)
        await self._backend.nodes.purge(self._max_age * 12)

    def _reap(self) -> None:
        """Forget the finished heartbeats (up to the first still under way) and chores,
        then raise the error of the first of them that failed: one round reports every
        failure seen by then, so stale errors never fail the rounds after an outage."""
        finished: list[asyncio.Task[None]] = []
        while self._in_flight and self._in_flight[0].done():
            finished.append(self._in_flight.popleft())
        for name, task in list(self._chores.items()):
            if task.done():
                finished.append(self._chores.pop(name))
        errors = [t.exception() for t in finished if not t.cancelled()]
        for error in errors:
            if error is not None:
                raise error

    async def execute(self) -> None:
        """Heartbeat until cancelled; heartbeats and purges under way are cancelled then."""
        try:
            await super().execute()
        finally:
            tasks = [*self._in_flight, *self._chores.values()]
            self._in_flight.clear()
            self._chores.clear()
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
            for task in tasks:
                if not task.cancelled():
                    task.exception()  # retrieved: the loop has ended anyway

    def __repr__(self) -> str:
        return f"<EventSubscriberManager {self.node_id} with {len(self._subscribers)}>"

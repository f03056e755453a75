"""EventSubscriptionCoordinator: the elected leader deciding who holds which source.

Only the holder of the coordinator lock coordinates. Each round it lists the live
subscribers (last seen at most ``subscriber_max_age`` ago, by the storage's clock) and
every holding, runs the pure ``allocate``, and applies the changes. Handover is
revoke-then-assign: a source leaving a live holder is first set REVOKING; it is
assigned to its new holder only in a later round, once the old holder's observer has
released it or the old holder is no longer live. Before any assignment is written,
the source's checkpoint is fenced at the new epoch (``CheckpointStorage.fence``), so a
paused old holder that wakes up can no longer save a checkpoint of it. A source whose
checkpoint stays locked by another transaction (a holder frozen inside its batch) is
not assigned this round (the fence gives up after a short lock timeout), so one such
source does not stall the others.

Leadership ends after ``leadership_max_duration`` (the lock is released so that
another node may take it) or when the lock is lost, which ``Lock.wait_lost`` reports;
a leader that lost its lock stands back for two intervals before contending again, so
that a standby takes over instead of racing it.
The lock is taken with a lease of ``subscriber_max_age``: a leader frozen longer than
that (SIGSTOP, a long pause) loses it on PostgreSQL, so a standby takes over within
about the max age, as it does for a dead leader. Before writing any change a round
confirms the lock (``Lock.confirm``), so a leader waking from such a pause does not
act on a round it started before noticing. Even then a deposed leader that still
writes is harmless: assignments carry epochs and the storage refuses an epoch that is
not greater than the current one.

A dead holder's source is given away only if the holder is still dead when the
change is written: ``allocate`` marks such changes with the max age, and the storage
checks the holder's record in the same transaction (locking it, so a heartbeat at that
moment commits after the change and the holder's next observer round sees it). A holder
that heartbeated since the subscribers were listed has the source revoked instead: its
checkpoint is already fenced at the new epoch, so it must hand the source over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import timedelta

from eventmill.backends.base import Assign, Backend, Lock, Revoke, SubscriptionChange
from eventmill.broker.allocation import GroupAllocation, allocate
from eventmill.broker.loop import BrokerLoop, check_interval
from eventmill.events import check_name
from eventmill.log_fields import fields

logger = logging.getLogger(__name__)

COORDINATOR_LOCK = "eventmill-coordinator"
"""The name of the lock whose holder coordinates."""

RELEASE_TIMEOUT = timedelta(seconds=2)
"""The longest a coordinator waits for its lock's release when giving leadership up
(stopping included)."""


class EventSubscriptionCoordinator(BrokerLoop):
    """Coordinates while it holds the lock ``lock_name``; otherwise waits for it.

    ``rounds`` counts every round (led or not); ``terms`` how many times it became the
    leader; ``is_leader`` whether it leads now. A round that leaves a handover waiting
    for a release runs again after a quarter of ``distribution_interval``.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        distribution_interval: timedelta = timedelta(milliseconds=500),
        leadership_max_duration: timedelta = timedelta(minutes=15),
        subscriber_max_age: timedelta = timedelta(seconds=5),
        lock_name: str = COORDINATOR_LOCK,
    ) -> None:
        super().__init__(distribution_interval, what="coordinator_distribution_interval")
        self._backend = backend
        self._max_duration = check_interval(
            leadership_max_duration, "coordinator_leadership_max_duration"
        )
        self._max_age = check_interval(subscriber_max_age, "subscriber_manager_subscriber_max_age")
        self.lock_name = check_name(lock_name, "lock name")
        self._lock: Lock | None = None
        self._lease_ends = 0.0
        self._contend_after = 0.0  # a deposed leader stands back until then
        self._watch: asyncio.Task[None] | None = None
        self.terms = 0
        self.last_allocation: list[GroupAllocation] = []
        """The allocation of the latest round led (for diagnostics)."""

    @property
    def is_leader(self) -> bool:
        """Whether this coordinator holds the lock now (as far as it knows)."""
        return self._lock is not None and self._lock.is_held

    @property
    def lock(self) -> Lock | None:
        """The coordinator lock while this coordinator leads."""
        return self._lock if self.is_leader else None

    async def run_round(self) -> timedelta | None:
        """Take the lock if free (waiting up to one interval), then coordinate one round
        if leading. Raises StorageError, ConflictError."""
        if not self.is_leader:
            await self._give_up()
            stand_back = self._contend_after - time.monotonic()
            if stand_back > 0:
                return timedelta(seconds=stand_back)
            lock = await self._backend.locks.wait_for_lock(
                self.lock_name, self.interval, lease=self._max_age
            )
            if lock is None:
                return timedelta(0)
            self._take(lock)
        elif time.monotonic() >= self._lease_ends:
            logger.info("coordinator: leadership reached its maximum duration; giving it up")
            await self._give_up()
            return self.interval  # let another node take it
        return await self.coordinate()

    async def coordinate(self) -> timedelta | None:
        """One allocation round (call it only while leading): list, allocate, fence the
        new assignments, apply. Returns a short wait when a handover waits for a
        release. Raises StorageError, ConflictError (another coordinator wrote first)."""
        subscribers = await self._backend.subscribers.list(max_age=self._max_age)
        holdings = await self._backend.subscriptions.list()
        allocations = allocate(subscribers, holdings, max_age=self._max_age)
        self.last_allocation = allocations
        changes: list[SubscriptionChange] = [
            change for allocation in allocations for change in allocation.changes
        ]
        if not changes or not self.is_leader:
            return self._next_wait(allocations)
        if self._lock is None or not await self._lock.confirm():
            return None  # deposed (e.g. frozen past the lease): act on nothing
        # Fence, then apply: not atomic. If the apply below fails or leadership is lost
        # in between, a checkpoint may stay fenced ahead of its holding. A dead holder's
        # source is simply assigned again next round (same epoch, already fenced); a live
        # holder's consumer meets StaleEpochError at its next save and drops the source,
        # and its observer releases it (``EventSubscriber.take_dropped``), after which
        # it is assigned under a newer epoch: no permanent stall, and no write at the
        # old epoch.
        unfenced = await self._fence([change for change in changes if isinstance(change, Assign)])
        if unfenced:
            changes = [change for change in changes if id(change) not in unfenced]
        if not self.is_leader:
            return None
        await self._backend.subscriptions.apply(changes)
        for change in changes:
            if isinstance(change, Assign):
                logger.info(
                    "assigned %s to %s on node %s (epoch %d)",
                    change.source,
                    change.subscriber_id,
                    change.node_id,
                    change.epoch,
                    extra=fields(group=change.group, source=change.source),
                )
            elif isinstance(change, Revoke):
                logger.info(
                    "revoking %s from its holder (handover)",
                    change.source,
                    extra=fields(group=change.group, source=change.source),
                )
        return self._next_wait(allocations, changed=True)

    def _next_wait(
        self, allocations: list[GroupAllocation], *, changed: bool = False
    ) -> timedelta | None:
        if changed or not all(allocation.settled for allocation in allocations):
            return self.interval / 4
        return None

    async def _fence(self, assigns: list[Assign]) -> set[int]:
        """Fence each assigned source's checkpoint at its new epoch (``fence_all``);
        return the ``id()`` of the assignments whose checkpoint stayed locked: they
        wait for a later round."""
        locked = await self._backend.checkpoints.fence_all(
            [(change.group, change.source, change.epoch) for change in assigns]
        )
        if not locked:
            return set()
        logger.warning("coordinator: %d checkpoints locked; assigning them later", len(locked))
        waiting = set(locked)
        return {id(a) for a in assigns if (a.group, a.source, a.epoch) in waiting}

    def _take(self, lock: Lock) -> None:
        self._lock = lock
        self.terms += 1
        self._lease_ends = time.monotonic() + self._max_duration.total_seconds()
        self._watch = asyncio.create_task(self._watch_lock(lock))
        logger.info("coordinator: leading (term %d)", self.terms)

    async def _watch_lock(self, lock: Lock) -> None:
        await lock.wait_lost()
        if self._lock is lock:
            logger.warning("coordinator: the lock was lost; no longer coordinating")
            # Let another node take over rather than race it for the lock at once.
            self._contend_after = time.monotonic() + 2 * self.interval.total_seconds()
            self.wake()

    async def _give_up(self) -> None:
        """Release the lock and end its watch, within RELEASE_TIMEOUT: a lock whose
        release does not finish in time is left to die with its connection."""
        lock, self._lock = self._lock, None
        watch, self._watch = self._watch, None
        if lock is not None:
            logger.info("coordinator: no longer leading (term %d ended)", self.terms)
        if watch is not None:
            watch.cancel()
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT.total_seconds()):
                if lock is not None:
                    await lock.release()
                if watch is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await watch
        except TimeoutError:
            logger.warning("coordinator: releasing the lock timed out")

    async def execute(self) -> None:
        """Coordinate (or wait to) until cancelled; the lock is released on the way out."""
        try:
            await super().execute()
        finally:
            await asyncio.shield(self._give_up())

    def __repr__(self) -> str:
        return f"<EventSubscriptionCoordinator leader={self.is_leader} terms={self.terms}>"

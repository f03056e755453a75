"""EventSubscriptionObserver: applies the coordinator's decisions to this node's
subscribers.

Each round it reads the holdings of this node and, per local subscriber:

1. withdraws every source set REVOKING (``withdraw`` returns once the in-flight batch
   is finished and its checkpoint saved) and every source it holds locally that is no
   longer assigned to it (or under another epoch);
2. records the releases (``Release``, checked against the epoch, so a late release
   never frees a newer assignment), which lets the coordinator go on with the handover;
3. accepts every source ASSIGNED to it that it does not hold under that epoch.

A subscriber may also drop a source by itself: when a save of it meets a checkpoint
fenced at a newer epoch (``take_dropped``). The coordinator fences before it applies
an assignment, so if that apply never happens (it failed, or leadership was lost in
between) while the holder is live, the holding stays ASSIGNED to it at the old epoch
and nobody would consume the source again. So a dropped source still ASSIGNED to its
subscriber at the epoch it was dropped at is released in step 2 (and not accepted
again under that epoch); the coordinator then assigns it under a newer epoch, which
passes the fence. Fencing stays strict: the old epoch never saves again.

``is_current`` tells whether the latest successful round is recent enough (younger
than the subscriber max age) for this node's view to be trusted: a node that was
paused or cut off longer than that may have been declared dead and its sources given
away, so it must not process until a round has brought it up to date.

While a subscriber added less than the subscriber max age ago holds no source yet, the
rounds come every quarter interval: a leader on another node assigns it sources in
its own next round, which this node cannot hear of sooner, and the wait for a new
subscriber's first source (a rebuild's start) is then at most that quarter instead of
a full interval. Each successful
round also ``confirms`` the node's ``OwnershipLease`` (``lease``, set by the
distributed broker): after a lapse the lease stays invalid until such a round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

from eventmill.backends.base import Backend, HoldingState, Release
from eventmill.broker.loop import BrokerLoop, check_interval
from eventmill.consumers.lease import OwnershipLease
from eventmill.consumers.subscription_consumer import EventSubscriber
from eventmill.errors import InvalidInputError
from eventmill.events import EventSourceIdentifier, check_name
from eventmill.log_fields import fields

logger = logging.getLogger(__name__)


class EventSubscriptionObserver(BrokerLoop):
    """Synchronises this node's subscribers with their holdings every
    ``synchronisation_interval``."""

    def __init__(
        self,
        backend: Backend,
        node_id: str,
        *,
        synchronisation_interval: timedelta = timedelta(milliseconds=500),
        subscriber_max_age: timedelta = timedelta(seconds=5),
    ) -> None:
        super().__init__(synchronisation_interval, what="observer_synchronisation_interval")
        self._backend = backend
        self.node_id = check_name(node_id, "node id")
        self._max_age = check_interval(subscriber_max_age, "subscriber_manager_subscriber_max_age")
        self._subscribers: dict[tuple[str, str], EventSubscriber] = {}
        self._accepted: dict[tuple[str, str], dict[EventSourceIdentifier, int]] = {}
        self._added: dict[tuple[str, str], float] = {}  # monotonic time of ``add``
        # sources subscribers dropped (take_dropped) whose release is not yet applied
        self._dropped: dict[tuple[str, str], dict[EventSourceIdentifier, int]] = {}
        self.changes = {"accepted": 0, "withdrawn": 0}
        """Sources accepted and withdrawn so far (for metrics)."""
        self._busy = asyncio.Lock()  # rounds, removals and releases take turns
        self.lease: OwnershipLease | None = None
        """The lease each successful round confirms (see ``consumers.lease``)."""

    @property
    def is_current(self) -> bool:
        """Whether a round succeeded less than the subscriber max age ago."""
        last = self.last_round_at
        return last is not None and time.monotonic() - last < self._max_age.total_seconds()

    def held(self, subscriber: EventSubscriber) -> dict[EventSourceIdentifier, int]:
        """The sources this observer gave ``subscriber``, with their epochs."""
        return dict(self._accepted.get((subscriber.group, subscriber.id), {}))

    def add(self, subscriber: EventSubscriber) -> None:
        """Start synchronising ``subscriber``. Raises InvalidInputError when another
        subscriber of the group has this id here."""
        key = (subscriber.group, subscriber.id)
        known = self._subscribers.get(key)
        if known is not None and known is not subscriber:
            raise InvalidInputError(f"subscriber {key[1]!r} of {key[0]!r} is already observed")
        if known is None:
            self._added[key] = time.monotonic()
        self._subscribers[key] = subscriber
        self._accepted.setdefault(key, {})

    async def remove(self, subscriber: EventSubscriber) -> None:
        """Withdraw and release every source of ``subscriber`` and stop synchronising
        it. Harmless if unknown; raises StorageError (having withdrawn everything)."""
        key = (subscriber.group, subscriber.id)
        async with self._busy:
            if self._subscribers.get(key) is not subscriber:
                return
            del self._subscribers[key]
            del self._added[key]
            self._dropped.pop(key, None)
            await self._release_all(subscriber, self._accepted.pop(key, {}))

    async def _release_all(
        self, subscriber: EventSubscriber, held: dict[EventSourceIdentifier, int]
    ) -> None:
        for source, epoch in held.items():
            await subscriber.withdraw(source)
            self._log_change(
                "withdrew (unregistering)", (subscriber.group, subscriber.id), source, epoch
            )
        await self._backend.subscriptions.apply(
            [
                Release(group=subscriber.group, source=source, subscriber_id=subscriber.id, epoch=e)
                for source, e in held.items()
            ]
        )

    async def run_round(self) -> timedelta | None:
        """One synchronisation (then the lease is confirmed); the next comes after a
        quarter interval while a new subscriber waits for its first source (see the
        module docstring). Raises StorageError."""
        started = time.monotonic()
        async with self._busy:
            await self._synchronise()
        if self.lease is not None:
            self.lease.confirmed(started)
        young = started - self._max_age.total_seconds()
        if any(not self._accepted[key] and added > young for key, added in self._added.items()):
            return self.interval / 4
        return None

    async def _synchronise(self) -> None:
        holdings = await self._backend.subscriptions.list(node_id=self.node_id)
        assigned: dict[tuple[str, str], dict[EventSourceIdentifier, int]] = {}
        revoking: list[tuple[tuple[str, str], EventSourceIdentifier, int]] = []
        for holding in holdings:
            if holding.subscriber_id is None:
                continue
            key = (holding.group, holding.subscriber_id)
            if key not in self._subscribers:
                continue
            if holding.state is HoldingState.ASSIGNED:
                assigned.setdefault(key, {})[holding.source] = holding.epoch
            elif holding.state is HoldingState.REVOKING:
                revoking.append((key, holding.source, holding.epoch))
        releases: list[Release] = []
        for key, source, epoch in revoking:
            subscriber = self._subscribers[key]
            self._accepted[key].pop(source, None)
            await subscriber.withdraw(source)
            self._log_change("withdrew (revoked)", key, source, epoch)
            releases.append(Release(group=key[0], source=source, subscriber_id=key[1], epoch=epoch))
        for key, subscriber in list(self._subscribers.items()):
            accepted = self._accepted[key]
            wanted = assigned.get(key, {})
            dropped = self._dropped.setdefault(key, {})
            for source, epoch in (await subscriber.take_dropped()).items():
                if accepted.get(source) == epoch:
                    del accepted[source]
                    dropped[source] = epoch
            for source, epoch in dropped.items():
                if wanted.get(source) == epoch:  # else it moved on: nothing to release
                    self._log_change("dropped (fenced at a newer epoch)", key, source, epoch)
                    releases.append(
                        Release(group=key[0], source=source, subscriber_id=key[1], epoch=epoch)
                    )
            for source, epoch in list(accepted.items()):
                if wanted.get(source) != epoch:
                    del accepted[source]
                    await subscriber.withdraw(source)
                    self._log_change("withdrew (no longer assigned)", key, source, epoch)
        if releases:
            await self._backend.subscriptions.apply(releases)
        released, self._dropped = self._dropped, {}
        for key, wanted in assigned.items():
            subscriber = self._subscribers[key]
            accepted = self._accepted[key]
            for source, epoch in wanted.items():
                if accepted.get(source) != epoch and released[key].get(source) != epoch:
                    await subscriber.accept(source, epoch)
                    accepted[source] = epoch
                    self._log_change("accepted", key, source, epoch)

    def _log_change(
        self, what: str, key: tuple[str, str], source: EventSourceIdentifier, epoch: int
    ) -> None:
        self.changes["accepted" if what == "accepted" else "withdrawn"] += 1
        logger.info(
            "%s %s (epoch %d)",
            what,
            source,
            epoch,
            extra=fields(group=key[0], subscriber=key[1], source=source),
        )

    def __repr__(self) -> str:
        return f"<EventSubscriptionObserver {self.node_id} observing {len(self._subscribers)}>"

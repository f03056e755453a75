"""EventBroker: decides which local subscriber holds which source, and tells them.

A broker is a ``Service`` (``execute()`` runs it until cancelled) and a ``Process``
(``status``). Subscribers are registered with it before or while it runs; it hands
each group's requested sources out among the group's subscribers with
``subscriber.accept(source, epoch)`` and takes them back with
``subscriber.withdraw(source)``. Handover is always revoke-then-assign, and before a
source is accepted under an epoch its checkpoint is fenced at that epoch
(``CheckpointStorage.fence``), so a former holder can no longer save it.

Who consumes the held sources is not the broker's business: whoever registers a
subscriber also runs its ``consume_all()`` (``EventProcessingNode`` does both).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from eventmill.consumers.subscription_consumer import EventSubscriber
from eventmill.services.service import Service
from eventmill.services.status import ProcessStatus


class EventBroker(Service[None], ABC):
    """Gives the sources of each subscriber group to its registered subscribers."""

    @abstractmethod
    async def register(self, subscriber: EventSubscriber) -> None:
        """Take part in allocation from now on (before or while the broker runs).

        Blocks at most for a storage write (distributed brokers record the subscriber).
        Raises InvalidInputError when a subscriber of that group with that id is already
        registered, StorageError when storage fails.
        """

    @abstractmethod
    async def unregister(self, subscriber: EventSubscriber) -> None:
        """Stop giving ``subscriber`` sources and take back every source it holds.

        Blocks until each held source was withdrawn (its in-flight batch finished and
        its checkpoint saved) and then forgets the subscriber, so its sources can move
        to other subscribers at once. Harmless for a subscriber that is not registered.
        Raises StorageError when storage fails.
        """

    @abstractmethod
    async def wait_ready(self) -> None:
        """Block until the broker runs and has applied one allocation round that saw
        every subscriber registered before this call (for a distributed broker: the
        subscribers are recorded and this node's assignments were applied once).

        Raises what made the broker fail, if it failed; LifecycleError once it stopped.
        """

    @property
    @abstractmethod
    def status(self) -> ProcessStatus:
        """INITIALISED before ``execute()``, WAITING or RUNNING while it runs, ERRORED
        while it is failing (it retries), STOPPED once cancelled."""

    @abstractmethod
    async def execute(self) -> None:
        """Run until cancelled. Does not withdraw anything on cancellation: unregister
        the subscribers first for a graceful stop."""

"""Processors: the user code a consumer feeds events to, in four kinds.

=====================================  =============================================
kind                                   an event counts as processed when
=====================================  =============================================
``EventProcessor`` / an async function ``process_event(event)`` returned
``AutoCommitEventIteratorProcessor``   the processor pulls the next event, or
                                       ``process`` returns normally
``ManagedEventIteratorProcessor``      the processor ``acknowledge``-s it; it saves
                                       with ``await progress.commit(force=...)``
``TransactionalEventProcessor``        its batch's transaction commits, together with
                                       the checkpoint (exactly-once on PostgreSQL)
=====================================  =============================================

Without a failure policy, an exception from a processor stops the pass: the consumer
saves the checkpoint of the events processed before it and re-raises it. With one
(``consumers.failures``), every kind is retried, parked or skipped per event.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TypeAlias

from eventmill.backends.base import ConsumerTransaction
from eventmill.events import EventSourceIdentifier, StoredEvent


class EventProcessor(ABC):
    """Handles one event at a time."""

    @abstractmethod
    async def process_event(self, event: StoredEvent) -> None:
        """Handle ``event``; raising stops the pass (the event is not processed)."""

    def around_page(self, events: Sequence[StoredEvent]) -> AbstractContextManager[None]:
        """A context entered while ``events`` (a page read from the source, or one held
        event replayed) are given to ``process_event`` in turn; it may end early (the
        pass ended, an exception). By default none; ``eventmill.tracing.traced`` opens
        its span here."""
        return nullcontext()


class AutoCommitEventIteratorProcessor(ABC):
    """Pulls events from an async iterator; pulling the next event (or returning
    normally) marks the previous one processed, and the consumer checkpoints as usual.

    Errors saving a checkpoint surface from the iterator's ``__anext__``.
    """

    @abstractmethod
    async def process(self, events: AsyncIterator[StoredEvent]) -> None:
        """Pull and handle events until the iterator ends (or return early)."""


class ConsumerProgress(ABC):
    """What a ``ManagedEventIteratorProcessor`` reports its progress through."""

    @abstractmethod
    def acknowledge(self, events: StoredEvent | Sequence[StoredEvent]) -> None:
        """Mark ``events`` (already pulled, in order) processed; nothing is saved yet.

        Raises InvalidInputError for an event that was not pulled.
        """

    @abstractmethod
    async def commit(self, *, force: bool = False) -> None:
        """Save the checkpoint of the acknowledged events if at least the consumer's
        ``checkpoint_every`` are unsaved, or if ``force`` and any are. Raises
        ConflictError/StaleEpochError/StorageError when the save fails."""


class ManagedEventIteratorProcessor(ABC):
    """Pulls events and manages its own progress: ``progress.acknowledge(events)`` once
    they are handled, ``await progress.commit(force=...)`` to save. What is acknowledged
    is also saved when the pass ends, normally or by an exception."""

    @abstractmethod
    async def process(self, events: AsyncIterator[StoredEvent], progress: ConsumerProgress) -> None:
        """Pull, handle, acknowledge and commit until the iterator ends."""


class TransactionalEventProcessor(ABC):
    """Handles a batch inside the transaction that then saves the batch's checkpoint.

    The contract: ``process_events`` gets at most ``checkpoint_every`` events and a
    ``ConsumerTransaction``. On PostgreSQL, ``transaction.connection`` is a
    ``psycopg.AsyncConnection`` in an open transaction: write your changes through it
    (do not commit, roll back or close it). The consumer then saves the checkpoint on the
    same connection and commits once, so your changes and the new place become visible
    together or not at all: after any crash each event's changes are applied exactly
    once. If ``process_events`` raises, the whole batch is rolled back and re-raised.
    In memory, ``connection`` is None and a raising batch's checkpoint and projection
    writes are undone, but effects outside eventmill are not.
    """

    @abstractmethod
    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        """Apply ``events`` using ``transaction``; raising rolls the batch back."""

    async def on_reset(
        self, source: EventSourceIdentifier, after: int | None, transaction: ConsumerTransaction
    ) -> None:
        """After a live reset of ``source`` (``eventmill reset``, ``reset_group``), called
        in the transaction of the first batch read from the new place, before it: undo
        here what the events of ``source`` after ``after`` (None: all of them) changed,
        so that replaying them gives exactly the state of a build from scratch. Also
        called, with no batch, when nothing is left to replay. By default nothing."""
        return None


ProcessEventFunction: TypeAlias = Callable[[StoredEvent], Awaitable[None]]

Processor: TypeAlias = (
    EventProcessor
    | AutoCommitEventIteratorProcessor
    | ManagedEventIteratorProcessor
    | TransactionalEventProcessor
    | ProcessEventFunction
)

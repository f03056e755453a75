"""EventConsumerStateStore: one consumer group's checkpoint in one source.

It remembers the version it last read or wrote, so saves are optimistic (a save that
lost to another writer raises ConflictError) and carry the holder's ``epoch`` (a save
from a holder whose source has moved raises StaleEpochError). After a failed save it
reads the stored checkpoint again, so the failure is not repeated forever: the caller
reloads with ``load()`` and carries on from what is stored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from eventmill.backends.base import Checkpoint, CheckpointStorage, ConsumerTransaction
from eventmill.conditions import MAX_POSITION
from eventmill.errors import ConflictError, InvalidInputError, InvalidSettingsError, describe
from eventmill.events import EventSourceIdentifier, check_identifier, check_name


class EventConsumerStateStore:
    """Loads, saves and resets the checkpoint of (``group``, ``source``)."""

    def __init__(
        self,
        checkpoints: CheckpointStorage,
        group: str,
        source: EventSourceIdentifier,
        *,
        epoch: int | None = None,
    ) -> None:
        self.checkpoints = checkpoints
        self.group = check_name(group, "group")
        self.source = check_identifier(source)
        if epoch is not None and (type(epoch) is not int or not 0 <= epoch <= MAX_POSITION):
            raise InvalidSettingsError(
                f"epoch must be None or an int from 0 to {MAX_POSITION}, not {describe(epoch)}"
            )
        self.epoch = epoch
        self._known: Checkpoint | None = None
        self._pending: Checkpoint | None = None

    @property
    def known(self) -> Checkpoint | None:
        """The checkpoint as last read or saved (None when there was none)."""
        return self._known

    async def load(self) -> int | None:
        """Read the stored checkpoint; return its ``after``. Raises StorageError."""
        self._known = await self.checkpoints.get(self.group, self.source)
        return None if self._known is None else self._known.after

    async def save(
        self, after: int | None, *, transaction: ConsumerTransaction | None = None
    ) -> Checkpoint:
        """Save ``after`` over the version last seen, with this store's epoch.

        Inside ``transaction`` (from ``self.transaction()``) the save becomes known only
        when it commits. Raises ConflictError or StaleEpochError (having re-read the
        stored checkpoint), InvalidInputError for an ``after`` that is not a place, or
        StorageError.
        """
        if after is not None and (type(after) is not int or not 0 <= after <= MAX_POSITION):
            raise InvalidInputError(
                f"after must be None or an int from 0 to {MAX_POSITION}, not {describe(after)}"
            )
        expected = None if self._known is None else self._known.version
        try:
            if transaction is None:
                saved = await self.checkpoints.save(
                    self.group, self.source, after, expected_version=expected, epoch=self.epoch
                )
            else:
                saved = await transaction.save_checkpoint(
                    self.group, self.source, after, expected_version=expected, epoch=self.epoch
                )
        except ConflictError:
            await self.load()
            raise
        if transaction is None:
            self._known = saved
        else:
            self._pending = saved
        return saved

    @asynccontextmanager
    async def transaction(
        self, *, bound: timedelta | None = None
    ) -> AsyncIterator[ConsumerTransaction]:
        """A transaction for a batch and its checkpoint: committed when the block exits
        normally, rolled back when it raises; ``bound``: see
        ``CheckpointStorage.transaction``. Raises StorageError."""
        self._pending = None
        try:
            async with self.checkpoints.transaction(bound=bound) as transaction:
                yield transaction
        finally:
            pending, self._pending = self._pending, None
        if pending is not None:
            self._known = pending

    async def reset(self) -> None:
        """Make the next reader start from the beginning (persisted). Raises StorageError."""
        await self.checkpoints.reset(self.group, self.source)
        await self.load()

    def __repr__(self) -> str:
        return f"<EventConsumerStateStore {self.group!r} {self.source} epoch={self.epoch}>"

"""Whole subscriber groups: list them, reset them live, retire them.

::

    await reset_group(backend, "order-summary", to_start=True)   # replay everything
    await reset_group(backend, "order-summary", to_sequence=1200, sources=[partition])
    await retire_group(backend, "order-summary-v1")               # delete what is left

**Live reset** (distributed broker, the default on PostgreSQL): in one storage step
every chosen source of the group gets a new epoch, its checkpoint is moved to the new
place under that epoch, and its holding is revoked. A holder still processing can then
save no checkpoint of it (its batch is rolled back or its progress dropped, with a
StaleEpochError it handles by giving the source up); its node's observer withdraws and
releases the source, and the coordinator assigns it again, under a newer epoch, to a
live subscriber, which reads the new checkpoint and replays from there. No node
restarts, and no save meets a ConflictError. A ``TransactionalEventProcessor``'s
``on_reset`` hook runs in the transaction of the first replayed batch, so clearing the
projection's rows and replaying commit together (exact). The singleton broker keeps
holdings in its process and does not see resets: reset its groups while no node runs.

**Retire**: delete a group's subscriber records, holdings and checkpoints at once,
refused (GroupInUseError) while one of its records was seen within ``max_age``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from eventmill.backends.base import Backend, Checkpoint, GroupSummary, check_age
from eventmill.conditions import MAX_POSITION
from eventmill.errors import InvalidInputError, describe
from eventmill.events import EventSourceIdentifier

IN_USE_MAX_AGE = timedelta(minutes=1)
"""A group counts as in use while one of its subscriber records was seen this recently."""


async def list_groups(
    backend: Backend, *, max_age: timedelta = IN_USE_MAX_AGE
) -> list[GroupSummary]:
    """Every group storage knows of, by name, with its live records counted against
    ``max_age``. Raises StorageError."""
    return await backend.groups.overview(max_age=check_age(max_age, "max_age"))


async def retire_group(
    backend: Backend, group: str, *, max_age: timedelta = IN_USE_MAX_AGE
) -> GroupSummary:
    """Delete every subscriber record, holding, checkpoint and parked stream of
    ``group`` at once (its record of skipped events stays); return what was deleted.
    Raises GroupInUseError (deleting nothing) while a record of it was seen within
    ``max_age``, InvalidIdentifierError, StorageError."""
    return await backend.groups.retire(group, max_age=check_age(max_age, "max_age"))


async def reset_group(
    backend: Backend,
    group: str,
    *,
    to_start: bool = False,
    to_sequence: int | None = None,
    to_time: datetime | None = None,
    sources: Sequence[EventSourceIdentifier] | None = None,
) -> list[Checkpoint]:
    """Replay ``group`` live (see the module docstring) from the start, after the
    sequence number ``to_sequence``, or from the first event observed at or after
    ``to_time`` (exactly one of the three); only ``sources`` if given. Returns the new
    checkpoints (empty when the group has no source). Raises InvalidInputError for bad
    arguments, ConflictError when a checkpoint stayed locked, StorageError."""
    chosen = [to_start is True, to_sequence is not None, to_time is not None]
    if sum(chosen) != 1 or to_start not in (True, False):
        raise InvalidInputError("reset needs exactly one of to_start, to_sequence, to_time")
    after: int | None = None
    if to_sequence is not None:
        if type(to_sequence) is not int or not 0 <= to_sequence <= MAX_POSITION:
            raise InvalidInputError(
                f"to_sequence must be an int from 0 to {MAX_POSITION}, not {describe(to_sequence)}"
            )
        after = to_sequence
    elif to_time is not None:
        if not isinstance(to_time, datetime):
            raise InvalidInputError(f"to_time must be a datetime, not {describe(to_time)}")
        if to_time.tzinfo is None:
            to_time = to_time.replace(tzinfo=UTC)
        after = await backend.groups.sequence_before(to_time)
    if sources is not None and (isinstance(sources, str) or not isinstance(sources, Sequence)):
        raise InvalidInputError(f"sources must be a sequence of identifiers: {describe(sources)}")
    return await backend.groups.reset(group, after=after, sources=sources)

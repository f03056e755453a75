"""Partitioned subscriptions: a category split into ``partitions`` sources that a group's
instances share, and the guard against changing that number under stored checkpoints.

A group asking for a category with ``partitions=N`` requests the N
``CategoryPartitionIdentifier``s of it instead; the broker allocates them like any
source (balance, stickiness, fencing, revoke-then-assign) and each has its own
checkpoint.

Why changing N is refused. A checkpoint says "every event of *this* partition up to
sequence number S is done". Partitions of another N group the streams differently:
partition 3 of 16 holds streams from several partitions of 8 at once (or the reverse),
each with its own S. Starting a new partition after the smallest of them repeats
events; after the largest skips some. No choice is right, so registration refuses
(PartitioningChangedError) while the group has progress in another partitioning of a
category it requests (the plain category counts as one partition). Asking for a reset
(``reset_repartitioned=True``) resets every checkpoint of the group in that category,
so all of it is processed again from the start under the new N: do that only with a
processor that can rebuild (a projection rebuilt from scratch), and with the old
instances stopped.
"""

from __future__ import annotations

from collections.abc import Sequence

from eventmill.backends.base import Checkpoint, CheckpointStorage
from eventmill.errors import InvalidInputError, PartitioningChangedError
from eventmill.events import (
    CategoryIdentifier,
    CategoryPartitionIdentifier,
    EventSourceIdentifier,
    check_identifier,
)


def partition_requests(
    sources: Sequence[EventSourceIdentifier], partitions: int | None
) -> list[EventSourceIdentifier]:
    """``sources`` with each category replaced by its ``partitions`` partitions (as they
    are when ``partitions`` is None). Raises InvalidIdentifierError for a partition count
    that is not a power of two from 1 to 64, InvalidInputError for a source that is not
    a category."""
    checked = [check_identifier(source) for source in sources]
    if partitions is None:
        return checked
    requests: list[EventSourceIdentifier] = []
    for source in checked:
        if not isinstance(source, CategoryIdentifier):
            raise InvalidInputError(f"only a category can be partitioned, not {source}")
        CategoryPartitionIdentifier(source.category, 0, partitions)  # validates the count
        requests.extend(
            CategoryPartitionIdentifier(source.category, number, partitions)
            for number in range(partitions)
        )
    return requests


def _partitioning(source: EventSourceIdentifier) -> tuple[str, int] | None:
    """(category, partition count) of a category or partition source, else None."""
    if isinstance(source, CategoryIdentifier):
        return source.category, 1
    if isinstance(source, CategoryPartitionIdentifier):
        return source.category, source.partitions
    return None


async def check_partitioning(
    checkpoints: CheckpointStorage,
    group: str,
    requests: Sequence[EventSourceIdentifier],
    *,
    reset: bool = False,
) -> None:
    """Refuse requests that partition a category otherwise than the group's stored
    progress does; with ``reset``, reset the group's checkpoints of such a category
    instead (it is processed again from the start).

    Blocks for one checkpoint listing (and a reset per checkpoint of a changed
    category). Raises PartitioningChangedError, StorageError.
    """
    wanted = dict(found for found in map(_partitioning, requests) if found is not None)
    if not wanted:
        return
    stored: dict[str, list[Checkpoint]] = {}
    for checkpoint in await checkpoints.list(group):
        found = _partitioning(checkpoint.source)
        if found is not None and found[0] in wanted:
            stored.setdefault(found[0], []).append(checkpoint)
    for category, records in sorted(stored.items()):
        count = wanted[category]
        other = sorted(
            {
                partitioning[1]
                for record in records
                if record.after is not None
                and (partitioning := _partitioning(record.source)) is not None
                and partitioning[1] != count
            }
        )
        if not other:
            continue
        if not reset:
            raise PartitioningChangedError(
                f"group {group!r} asks for category {category!r} in {count} partition(s) "
                f"but has checkpoints of it in {', '.join(map(str, other))}: they do not map "
                "onto the new partitions (events would be skipped or repeated). Keep the "
                "old number, or ask for a reset (reset_repartitioned=True) to process the "
                "category again from the start"
            )
        for record in records:
            await checkpoints.reset(group, record.source)

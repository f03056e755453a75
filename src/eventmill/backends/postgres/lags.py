"""Counting what readers have left to read, without reading it: one statement for any
number of (source, after) places, each counted with the index its reads use."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from eventmill.backends.base import SourceLag
from eventmill.events import (
    PARTITION_BUCKETS,
    CategoryIdentifier,
    CategoryPartitionIdentifier,
    EventSourceIdentifier,
    LogIdentifier,
    StreamIdentifier,
)

if TYPE_CHECKING:
    from eventmill.backends.postgres.backend import PostgresBackend


def _counted(table_filter: str, order: str) -> str:
    """The count and first stored time of the events of one place, as a LATERAL."""
    return (
        "CROSS JOIN LATERAL (SELECT count(*) AS events FROM {schema}.events AS e"
        f" WHERE {table_filter}) AS c"
        " LEFT JOIN LATERAL (SELECT e.observed_at FROM {schema}.events AS e"
        f" WHERE {table_filter} ORDER BY {order} LIMIT 1) AS f ON true"
    )


_LOG = "e.sequence_number > p.after"
_CATEGORY = "e.category = p.category AND e.sequence_number > p.after"
_PARTITION = (
    f"e.category = p.category AND e.stream_hash %% {PARTITION_BUCKETS} = ANY (p.buckets)"
    " AND e.sequence_number > p.after"
)
_STREAM = "e.category = p.category AND e.stream = p.stream AND e.position > p.after"

_LAGS = " UNION ALL ".join(
    [
        "SELECT p.i, c.events, f.observed_at"
        " FROM unnest(%(log_i)s::int[], %(log_after)s::bigint[]) AS p(i, after) "
        + _counted(_LOG, "e.sequence_number"),
        "SELECT p.i, c.events, f.observed_at FROM unnest(%(category_i)s::int[],"
        " %(category)s::text[], %(category_after)s::bigint[]) AS p(i, category, after) "
        + _counted(_CATEGORY, "e.sequence_number"),
        "SELECT p.i, c.events, f.observed_at FROM (SELECT q.i, q.category,"
        " string_to_array(q.buckets, ',')::int[] AS buckets, q.after FROM"
        " unnest(%(partition_i)s::int[], %(partition_category)s::text[],"
        " %(partition_buckets)s::text[], %(partition_after)s::bigint[])"
        " AS q(i, category, buckets, after)) AS p " + _counted(_PARTITION, "e.sequence_number"),
        "SELECT p.i, c.events, f.observed_at FROM unnest(%(stream_i)s::int[],"
        " %(stream_category)s::text[], %(stream)s::text[], %(stream_after)s::bigint[])"
        " AS p(i, category, stream, after) " + _counted(_STREAM, "e.position"),
    ]
)


_PARAMETERS = (
    *("log_i", "log_after", "category_i", "category", "category_after"),
    *("partition_i", "partition_category", "partition_buckets", "partition_after"),
    *("stream_i", "stream_category", "stream", "stream_after"),
)


async def count_lags(
    backend: PostgresBackend, places: Sequence[tuple[EventSourceIdentifier, int | None]]
) -> list[SourceLag]:
    """``EventStorage.lags`` in one statement. Counts the committed events after each
    place, including any not yet readable below the visibility watermark."""
    if not places:
        return []
    parameters: dict[str, list[Any]] = {name: [] for name in _PARAMETERS}
    for i, (source, after) in enumerate(places):
        start = -1 if after is None else after
        if isinstance(source, LogIdentifier):
            parameters["log_i"].append(i)
            parameters["log_after"].append(start)
        elif isinstance(source, CategoryIdentifier) or (
            isinstance(source, CategoryPartitionIdentifier) and source.partitions == 1
        ):
            parameters["category_i"].append(i)
            parameters["category"].append(source.category)
            parameters["category_after"].append(start)
        elif isinstance(source, CategoryPartitionIdentifier):
            parameters["partition_i"].append(i)
            parameters["partition_category"].append(source.category)
            parameters["partition_buckets"].append(",".join(map(str, source.buckets)))
            parameters["partition_after"].append(start)
        else:
            assert isinstance(source, StreamIdentifier)
            parameters["stream_i"].append(i)
            parameters["stream_category"].append(source.category)
            parameters["stream"].append(source.stream)
            parameters["stream_after"].append(start)
    found: dict[int, tuple[int, datetime | None]] = {}
    async with backend.connection() as connection:
        cursor = await connection.execute(backend.sql(_LAGS), parameters)
        for i, events, oldest_at in await cursor.fetchall():
            found[i] = (events, oldest_at)
    return [SourceLag(events=found[i][0], oldest_at=found[i][1]) for i in range(len(places))]

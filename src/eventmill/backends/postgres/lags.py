"""Counting what readers have left to read, without reading it: one statement for any
number of (source, after) places, each counted with the index its reads use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from eventmill.backends.base import LagPlace, SourceLag
from eventmill.events import (
    PARTITION_BUCKETS,
    CategoryIdentifier,
    CategoryPartitionIdentifier,
    LogIdentifier,
    StreamIdentifier,
)

if TYPE_CHECKING:
    from eventmill.backends.postgres.backend import PostgresBackend


_END = 2**63 - 1
"""``through`` for no bound."""
_NEEDED = f"(c.events > 0 OR p.through < {_END})"
"""Whether the first event after ``after`` may exist: not when an unbounded span holds
no event (most places: caught-up readers), so its probes are skipped."""


def _counted(where: str, place: str) -> str:
    """A place's count and newest place, and the first stored time after ``p.after``,
    as LATERALs over the events matching ``where``."""
    return (
        f"CROSS JOIN LATERAL (SELECT count(*) AS events, max(e.{place}) AS newest"
        f" FROM {{schema}}.events AS e WHERE {where} AND e.{place} > p.after"
        f" AND e.{place} <= p.through) AS c"
        " LEFT JOIN LATERAL (SELECT e.observed_at FROM {schema}.events AS e"
        f" WHERE {where} AND e.{place} > p.after AND {_NEEDED}"
        f" ORDER BY e.{place} LIMIT 1) AS f ON true"
    )


_BUCKET = (
    f"e.category = p.category AND e.stream_hash %% {PARTITION_BUCKETS} = b.bucket"
    " AND e.sequence_number > p.after"
)
_PARTITION_COUNTED = (
    # one ordered index probe per bucket of the partition, as partition reads do
    "CROSS JOIN LATERAL (SELECT sum(k.events)::bigint AS events, max(k.newest) AS newest"
    " FROM unnest(p.buckets) AS b(bucket) CROSS JOIN LATERAL (SELECT count(*) AS events,"
    " max(e.sequence_number) AS newest FROM {schema}.events AS e"
    f" WHERE {_BUCKET} AND e.sequence_number <= p.through) AS k) AS c"
    " LEFT JOIN LATERAL (SELECT x.observed_at FROM unnest(p.buckets) AS b(bucket)"
    " CROSS JOIN LATERAL (SELECT e.sequence_number, e.observed_at FROM {schema}.events AS e"
    f" WHERE {_BUCKET} AND {_NEEDED} ORDER BY e.sequence_number LIMIT 1) AS x"
    " ORDER BY x.sequence_number LIMIT 1) AS f ON true"
)
"""A partition's count and first event, one ordered index probe per bucket."""

_COLUMNS = "SELECT p.i, c.events, c.newest, f.observed_at FROM "
_LAGS = " UNION ALL ".join(
    [
        _COLUMNS + "unnest(%(log_i)s::int[], %(log_after)s::bigint[], %(log_through)s::bigint[])"
        " AS p(i, after, through) " + _counted("true", "sequence_number"),
        _COLUMNS + "unnest(%(category_i)s::int[], %(category)s::text[],"
        " %(category_after)s::bigint[], %(category_through)s::bigint[])"
        " AS p(i, category, after, through) "
        + _counted("e.category = p.category", "sequence_number"),
        _COLUMNS + "(SELECT q.i, q.category, string_to_array(q.buckets, ',')::int[] AS buckets,"
        " q.after, q.through FROM unnest(%(partition_i)s::int[], %(partition_category)s::text[],"
        " %(partition_buckets)s::text[], %(partition_after)s::bigint[],"
        " %(partition_through)s::bigint[]) AS q(i, category, buckets, after, through)) AS p "
        + _PARTITION_COUNTED,
        _COLUMNS + "unnest(%(stream_i)s::int[], %(stream_category)s::text[], %(stream)s::text[],"
        " %(stream_after)s::bigint[], %(stream_through)s::bigint[])"
        " AS p(i, category, stream, after, through) "
        + _counted("e.category = p.category AND e.stream = p.stream", "position"),
    ]
)

_PARAMETERS = (
    *("log_i", "log_after", "log_through", "category_i", "category", "category_after"),
    *("category_through", "partition_i", "partition_category", "partition_buckets"),
    *("partition_after", "partition_through", "stream_i", "stream_category", "stream"),
    *("stream_after", "stream_through"),
)


async def count_lags(backend: PostgresBackend, places: Sequence[LagPlace]) -> list[SourceLag]:
    """``EventStorage.lags`` in one statement. Counts the committed events of each
    span, including any not yet readable below the visibility watermark."""
    if not places:
        return []
    parameters: dict[str, list[Any]] = {name: [] for name in _PARAMETERS}
    for i, (source, after, through) in enumerate(places):
        start = -1 if after is None else after
        end = _END if through is None else through
        if isinstance(source, LogIdentifier):
            parameters["log_i"].append(i)
            parameters["log_after"].append(start)
            parameters["log_through"].append(end)
        elif isinstance(source, CategoryIdentifier) or (
            isinstance(source, CategoryPartitionIdentifier) and source.partitions == 1
        ):
            parameters["category_i"].append(i)
            parameters["category"].append(source.category)
            parameters["category_after"].append(start)
            parameters["category_through"].append(end)
        elif isinstance(source, CategoryPartitionIdentifier):
            parameters["partition_i"].append(i)
            parameters["partition_category"].append(source.category)
            parameters["partition_buckets"].append(",".join(map(str, source.buckets)))
            parameters["partition_after"].append(start)
            parameters["partition_through"].append(end)
        else:
            assert isinstance(source, StreamIdentifier)
            parameters["stream_i"].append(i)
            parameters["stream_category"].append(source.category)
            parameters["stream"].append(source.stream)
            parameters["stream_after"].append(start)
            parameters["stream_through"].append(end)
    found: dict[int, SourceLag] = {}
    async with backend.connection() as connection, connection.transaction():
        # Hundreds of small index probes: compiling them (JIT, which the planner picks
        # from the summed estimates) costs far more than running them.
        await connection.execute("SET LOCAL jit = off")
        cursor = await connection.execute(backend.sql(_LAGS), parameters)
        for i, events, newest, oldest_at in await cursor.fetchall():
            found[i] = SourceLag(events=events, newest=newest, oldest_at=oldest_at)
    return [found[i] for i in range(len(places))]

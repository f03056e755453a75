"""Partition reads on PostgreSQL use the bucket index and cost what they return
(EXPLAIN ANALYZE on a category of 150,000 events), with generic and custom plans; the
index migration applies to a store that already has events."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from psycopg import sql

from eventmill import CategoryPartitionIdentifier, NewEvent
from eventmill.backends.postgres import PostgresBackend
from eventmill.backends.postgres.event_storage import (
    _SET_WATERMARK,
    _partition_parameters,
    _partition_query,
)
from eventmill.events import stream_hash
from eventmill.store import EventStore
from tests.postgres_support import connect, fresh_postgres_backend

pytestmark = pytest.mark.postgres

STREAMS = 2_000
EVENTS = 200_000  # two thirds in "orders", the rest in "other"
INDEX = "events_category_bucket_sequence_number_idx"


@pytest.fixture
async def big_backend() -> AsyncIterator[PostgresBackend]:
    """A backend whose "orders" category holds 133,334 events over 2,000 interleaved
    streams (written by SQL directly, stamped with the real stream hash), analysed."""
    async with fresh_postgres_backend(max_size=2) as backend:
        names = [f"order-{number}" for number in range(STREAMS)]
        hashes = [stream_hash(name) for name in names]
        async with backend.connection() as connection:
            await connection.execute(
                backend.sql(
                    "INSERT INTO {schema}.events (sequence_number, name, category, stream,"
                    " position, payload, metadata, occurred_at, stream_hash, transaction_id)"
                    " SELECT g, 'placed', CASE WHEN g %% 3 = 0 THEN 'other' ELSE 'orders' END,"
                    " (%(names)s::text[])[1 + g %% %(streams)s], g / %(streams)s, '{{}}', '{{}}',"
                    " now(), (%(hashes)s::bigint[])[1 + g %% %(streams)s], pg_current_xact_id()"
                    " FROM generate_series(1, %(events)s) AS g"
                ),
                {"names": names, "hashes": hashes, "streams": STREAMS, "events": EVENTS},
            )
            await connection.execute(backend.sql("ANALYZE {schema}.events"))
        yield backend


def plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(child for sub in node.get("Plans", []) for child in plan_nodes(sub))]


async def explain(
    backend: PostgresBackend,
    partition: CategoryPartitionIdentifier,
    after: int,
    limit: int,
    mode: str,
) -> tuple[int, int, list[dict[str, Any]]]:
    """Rows returned, shared buffers touched and plan nodes of the storage's own partition
    read, prepared and executed under ``plan_cache_mode = mode``."""
    text = backend.sql(_partition_query(partition.partitions, latest=False))
    names: list[str] = []

    def numbered(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    async with await connect() as connection:
        prepared = re.sub(r"%\((\w+)\)s", numbered, text.as_string(connection)).replace("%%", "%")
        values: dict[str, object] = {
            **_partition_parameters(partition),
            "after": after,
            "limit": limit,
        }
        await connection.execute(sql.SQL("SET plan_cache_mode = {}").format(sql.Identifier(mode)))
        await connection.execute(backend.sql(_SET_WATERMARK))  # as the storage does
        await connection.execute(sql.SQL("PREPARE partition_read AS ") + sql.SQL(prepared))
        arguments = sql.SQL(", ").join(sql.Literal(values[name]) for name in names)
        cursor = await connection.execute(
            sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE partition_read ({})").format(
                arguments
            )
        )
        row = await cursor.fetchone()
    assert row is not None
    top = row[0][0]["Plan"]
    buffers = top["Shared Hit Blocks"] + top["Shared Read Blocks"]
    return top["Actual Rows"], buffers, plan_nodes(top)


async def test_a_partition_read_uses_the_bucket_index_and_touches_about_what_it_returns(
    big_backend: PostgresBackend,
) -> None:
    for count in (2, 16, 64):
        partition = CategoryPartitionIdentifier("orders", count - 1, count)
        scans = 64 // count
        for mode in ("force_generic_plan", "force_custom_plan"):
            # (A custom plan for 1,000 of the 2,083 events of a partition of 64 rightly
            # prefers a bitmap scan and a sort: it reads half the partition anyway.)
            first = 1000 if count <= 16 else 200
            for after, limit in ((0, first), (100_000, 100), (0, 10)):
                rows, buffers, nodes = await explain(big_backend, partition, after, limit, mode)
                assert rows == limit
                kinds = {node["Node Type"] for node in nodes}
                assert not kinds & {"Seq Scan", "Sort", "Bitmap Heap Scan"}, kinds
                index_scans = [node for node in nodes if node["Node Type"] == "Index Scan"]
                assert len(index_scans) == scans
                assert {node["Index Name"] for node in index_scans} == {INDEX}
                # About one heap page per returned row, plus an index descent per
                # bucket; the partition holds 133,334 / count events, far more.
                assert buffers <= 1.2 * rows + 6 * scans + 10, (count, mode, after, buffers)
            rows, buffers, _ = await explain(big_backend, partition, EVENTS, 100, mode)
            assert rows == 0
            assert buffers <= 4 * scans, (count, mode, buffers)


async def test_the_partition_index_migration_applies_to_a_store_with_events() -> None:
    async with fresh_postgres_backend(max_size=2) as backend:
        store = EventStore(backend)
        for number in range(20):
            await store.stream(category="orders", stream=f"s-{number}").publish(
                [NewEvent(name="placed")]
            )
        async with backend.connection() as connection:
            await connection.execute(backend.sql(f"DROP INDEX {{schema}}.{INDEX}"))
            await connection.execute(
                backend.sql("DELETE FROM {schema}.schema_version WHERE version = 4")
            )
        assert await backend.install_schema() == [4]
        async with backend.connection() as connection:
            cursor = await connection.execute(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND indexname = %s",
                (backend.schema, INDEX),
            )
            row = await cursor.fetchone()
        assert row is not None and "(stream_hash % (64)::bigint)" in row[0]
        category = await store.category("orders").read()
        for part in range(4):
            partition = CategoryPartitionIdentifier("orders", part, 4)
            assert await store.source(partition).read() == [
                e for e in category if partition.contains(e.stream)
            ]

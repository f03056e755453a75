"""A node frozen inside an exactly-once batch does not keep its source (issue 12).

Three node processes on PostgreSQL (``tests/component/frozen_batch_node.py``): a
coordinator and two observers, A and B, each with an exactly-once subscriber of one
source. A holds the source and SIGSTOPs itself inside a batch transaction, after
saving its checkpoint (so the checkpoint row is locked) and before the commit. The
server ends that transaction once it has been idle for the lease margin, so the
coordinator can fence the checkpoint and give the source to B, which processes every
later event while A is still frozen. Each event's row is committed exactly once; A's
frozen batch never commits, also after A gets SIGCONT.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from eventmill.backends.postgres import PostgresBackend
from tests.component.frozen_batch_node import TABLE
from tests.component.test_zombie_processing import cluster_of, publish, wait_for
from tests.postgres_support import fresh_postgres_backend

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

EVENTS = 60
FREEZE_AT = 15


async def applied(backend: PostgresBackend) -> list[tuple[int, str, Any]]:
    async with backend.connection() as connection:
        cursor = await connection.execute(
            backend.sql(
                "SELECT sequence_number, node_id, extract(epoch FROM at)::float8"
                " FROM {schema}.frozen_applied ORDER BY sequence_number, at"
            )
        )
        return list(await cursor.fetchall())


async def test_a_frozen_exactly_once_batch_lets_its_source_move() -> None:
    async with fresh_postgres_backend(max_size=2) as backend:
        async with backend.connection() as connection:
            await connection.execute(backend.sql(TABLE))
        await publish(backend, 1)

        async def applied_by(node_id: str, at_least: int = 1) -> bool:
            return sum(row[1] == node_id for row in await applied(backend)) >= at_least

        async with cluster_of(backend, "tests.component.frozen_batch_node") as cluster:
            await cluster.start("coordinator", "coordinator")
            a = await cluster.start("a", "observer", freeze_at=FREEZE_AT)
            await wait_for(lambda: applied_by("a"), "A to hold the source")
            await cluster.start("b", "observer")
            await publish(backend, EVENTS - 1)

            async def a_is_frozen() -> bool:
                return a.is_stopped()

            await wait_for(a_is_frozen, "A to freeze itself inside a batch")

            async def b_applied_all() -> bool:
                return {row[0] for row in await applied(backend)} == set(range(1, EVENTS + 1))

            await wait_for(b_applied_all, "B to process the source while A is frozen")
            assert a.is_stopped()
            frozen_at = next(r["frozen_at"] for r in a.reports if "frozen_at" in r)
            by_b = [row for row in await applied(backend) if row[1] == "b"]
            print(f"freeze to B's first commit: {by_b[0][2] - frozen_at:.2f} s")

            thawed_at = time.time()
            a.process.send_signal(signal.SIGCONT)

            async def a_dropped_the_source() -> bool:
                latest = [r for r in a.reports if r.get("time", 0) > thawed_at]
                return any(r["lease_valid"] and not r["held"] for r in latest)

            await wait_for(a_dropped_the_source, "A to renew its lease and drop the source")
            await cluster.stop_all()

        rows = await applied(backend)
        assert [row[0] for row in rows] == list(range(1, EVENTS + 1))
        by_a = [row[0] for row in rows if row[1] == "a"]
        assert by_a == list(range(1, len(by_a) + 1))
        assert len(by_a) < FREEZE_AT
        assert [row[0] for row in rows if row[1] == "b"] == list(range(len(by_a) + 1, EVENTS + 1))

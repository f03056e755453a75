"""A worker for the exactly-once test: consumes category ``work`` with a transactional
processor that inserts one row per event into ``<schema>.applied``; prints ``batch``
after each batch, before its commit, and ``drained`` when done. Run:
``python -m tests.integration.exactly_once_worker DSN SCHEMA``."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from psycopg import sql

from eventmill import CategoryIdentifier
from eventmill.backends.base import ConsumerTransaction
from eventmill.consumers import TransactionalEventProcessor
from eventmill.events import StoredEvent
from tests.integration.worker_support import drain

WORK = CategoryIdentifier("work")


class ApplyRows(TransactionalEventProcessor):
    def __init__(self, schema: str) -> None:
        self.insert = sql.SQL(
            "INSERT INTO {}.applied (sequence_number) SELECT unnest(%s::bigint[])"
        ).format(sql.Identifier(schema))

    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        numbers = [event.sequence_number for event in events]
        connection = transaction.connection
        assert connection is not None  # PostgreSQL
        await connection.execute(self.insert, (numbers,))
        print("batch", numbers[-1], flush=True)  # not committed yet: a kill may land here


async def main(dsn: str, schema: str) -> None:
    await drain(dsn, schema, WORK, "exactly-once", ApplyRows(schema), page_size=500, every=50)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))

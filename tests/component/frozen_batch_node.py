"""A node process for ``test_frozen_batch``:
``python -m tests.component.frozen_batch_node CONFIG_JSON``.

An ``EventProcessingNode`` on PostgreSQL (mode ``coordinator`` or ``observer``) with
the fast broker settings of ``zombie_node``. An observer holds one exactly-once
subscriber of the group ``exact`` over the category ``orders``: each batch (up to 10
events) inserts one row per event into ``{schema}.frozen_applied`` (sequence number,
node, ``clock_timestamp()``) in the batch's checkpoint transaction. With
``freeze_at: N`` the node SIGSTOPs itself inside the first batch whose checkpoint
reaches N, right after saving that checkpoint and before the commit: its
transaction stays open, holding the checkpoint row locked. Before stopping it prints
``{"frozen_at": time.time()}``.

It prints ``ready`` once running, then every 20 ms a JSON line: whether its ownership
lease is valid, the sources it holds, and ``time.time()``. SIGTERM stops it gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from eventmill.backends.base import Checkpoint, ConsumerTransaction
from eventmill.backends.postgres import PostgresBackend
from eventmill.backends.postgres.checkpoints import PostgresConsumerTransaction
from eventmill.consumers.processors import TransactionalEventProcessor
from eventmill.events import CategoryIdentifier, EventSourceIdentifier, StoredEvent
from eventmill.node import EventProcessingNode, NodeMode, NodeSettings
from tests.component.zombie_node import BROKER_SETTINGS, report_holdings

TABLE = """
CREATE TABLE {schema}.frozen_applied (
    sequence_number bigint NOT NULL, node_id text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp())
"""
ORDERS = CategoryIdentifier("orders")


class ApplyRows(TransactionalEventProcessor):
    """Inserts one row per event in the batch's transaction."""

    def __init__(self, backend: PostgresBackend, node_id: str) -> None:
        self.node_id = node_id
        self.insert = backend.sql(
            "INSERT INTO {schema}.frozen_applied (sequence_number, node_id)"
            " SELECT unnest(%s::bigint[]), %s"
        )

    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        connection = transaction.connection
        assert connection is not None  # PostgreSQL
        await asyncio.sleep(0.02)
        await connection.execute(self.insert, ([e.sequence_number for e in events], self.node_id))


def freeze_after_saving(freeze_at: int) -> None:
    """Make the first checkpoint save (in a transaction) reaching ``freeze_at`` stop
    this process right after the save, before the commit."""
    save = PostgresConsumerTransaction.save_checkpoint

    async def save_then_freeze(
        self: PostgresConsumerTransaction,
        group: str,
        source: EventSourceIdentifier,
        after: int | None,
        *,
        expected_version: int | None,
        epoch: int | None = None,
    ) -> Checkpoint:
        saved = await save(
            self, group, source, after, expected_version=expected_version, epoch=epoch
        )
        if after is not None and after >= freeze_at and not frozen:
            frozen.append(after)
            print(json.dumps({"frozen_at": time.time()}), flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        return saved

    frozen: list[int] = []
    PostgresConsumerTransaction.save_checkpoint = save_then_freeze  # type: ignore[method-assign]


async def run_node(config: dict[str, Any]) -> None:
    """Run the node ``config`` describes until SIGTERM."""
    node_id: str = config["node_id"]
    mode = NodeMode(config["mode"])
    if config.get("freeze_at") is not None:
        freeze_after_saving(config["freeze_at"])
    backend = await PostgresBackend.connect(
        config["dsn"], schema=config["schema"], min_size=1, max_size=3
    )
    try:
        node = EventProcessingNode(
            backend,
            mode=mode,
            node_id=node_id,
            settings=NodeSettings(
                poll_interval=timedelta(milliseconds=200),
                checkpoint_interval=10,
                shutdown_timeout=timedelta(seconds=5),
                broker_settings=BROKER_SETTINGS,
            ),
        )
        handle = None
        if mode is not NodeMode.COORDINATOR:
            handle = node.register_subscriber(
                group="exact", source=ORDERS, processor=ApplyRows(backend, node_id)
            )
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with node:
            print("ready", flush=True)
            reporter = asyncio.get_running_loop().create_task(report_holdings(node, handle))
            await stop.wait()
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
    finally:
        await backend.close()


if __name__ == "__main__":
    asyncio.run(run_node(json.loads(sys.argv[1])))

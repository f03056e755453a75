"""A node process for ``test_zombie_processing``:
``python -m tests.component.zombie_node CONFIG_JSON``.

An ``EventProcessingNode`` on PostgreSQL (mode ``coordinator`` or ``observer``) with
fast broker settings. An observer holds one at-least-once subscriber of the group
``slow`` over the category ``orders``, whose processor works for 20 ms on each event,
then inserts a row into ``{schema}.zombie_processed`` (sequence number, node, epoch,
``clock_timestamp()``). With ``freeze_at: N`` the node SIGSTOPs itself right after
recording event N, the first time it gets there: frozen in the middle of a pass,
between two events (so when it wakes, its consumer goes on before anything else).

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
from datetime import timedelta
from typing import Any

from eventmill.backends.postgres import PostgresBackend
from eventmill.broker.distributed import DistributedEventBroker, DistributedEventBrokerSettings
from eventmill.consumers.processors import EventProcessor
from eventmill.events import CategoryIdentifier, StoredEvent, source_key
from eventmill.node import EventProcessingNode, NodeMode, NodeSettings, SubscriberHandle

TABLE = """
CREATE TABLE {schema}.zombie_processed (
    sequence_number bigint NOT NULL, node_id text NOT NULL, epoch bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp())
"""
ORDERS = CategoryIdentifier("orders")
BROKER_SETTINGS = DistributedEventBrokerSettings(
    subscriber_manager_heartbeat_interval=timedelta(milliseconds=100),
    subscriber_manager_purge_interval=timedelta(milliseconds=200),
    subscriber_manager_subscriber_max_age=timedelta(milliseconds=600),
    coordinator_distribution_interval=timedelta(milliseconds=50),
    observer_synchronisation_interval=timedelta(milliseconds=50),
)
WORK = 0.02
"""Seconds each event takes to process (before its row is inserted)."""


class SlowRecorder(EventProcessor):
    """Works for ``WORK``, then records the event with the epoch it is held under."""

    def __init__(self, backend: PostgresBackend, node_id: str, freeze_at: int | None) -> None:
        self.backend = backend
        self.node_id = node_id
        self.freeze_at = freeze_at
        self.handle: SubscriberHandle | None = None
        self.epoch = -1
        self.insert = backend.sql(
            "INSERT INTO {schema}.zombie_processed (sequence_number, node_id, epoch)"
            " VALUES (%s, %s, %s)"
        )

    async def process_event(self, event: StoredEvent) -> None:
        assert self.handle is not None
        await asyncio.sleep(WORK)
        self.epoch = self.handle.subscriber.sources.get(ORDERS, self.epoch)
        async with self.backend.connection() as connection:
            await connection.execute(self.insert, (event.sequence_number, self.node_id, self.epoch))
        if event.sequence_number == self.freeze_at:
            self.freeze_at = None
            os.kill(os.getpid(), signal.SIGSTOP)


async def report_holdings(node: EventProcessingNode, handle: SubscriberHandle | None) -> None:
    """Print the lease's validity and the sources held, as a JSON line every 20 ms."""
    broker = node.broker
    assert isinstance(broker, DistributedEventBroker)
    while True:
        line = {
            "lease_valid": broker.manager.lease.is_valid(),
            "held": [] if handle is None else [source_key(s) for s in handle.subscriber.sources],
            "time": time.time(),
        }
        print(json.dumps(line), flush=True)
        await asyncio.sleep(0.02)


async def run_node(config: dict[str, Any]) -> None:
    """Run the node ``config`` describes until SIGTERM."""
    node_id: str = config["node_id"]
    mode = NodeMode(config["mode"])
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
            recorder = SlowRecorder(backend, node_id, config.get("freeze_at"))
            handle = recorder.handle = node.register_subscriber(
                group="slow", source=ORDERS, processor=recorder
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

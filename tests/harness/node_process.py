"""A broker node process for multi-node tests (``NodeSet`` starts it).

Run ``python -m tests.harness.node_process CONFIG_JSON``. The node connects to
PostgreSQL, runs a ``DistributedEventBroker`` and one ``EventSubscriptionConsumer`` per
configured group, and records into its schema:

- ``processed``: one row per processed event (group, source key, event id, sequence
  number, subscriber id, node id, epoch, ``clock_timestamp()``). Groups with
  ``"transactional": true`` insert it in the batch's checkpoint transaction
  (exactly-once); the others insert it before the checkpoint is saved (at-least-once);
- ``node_log``: a row each time the node starts or stops leading.

Each subscriber is polled by a ``PollingService`` inside an ``ErrorHandlingService``
(retry with backoff); a pass is skipped while the broker is not current (after a
pause longer than the subscriber max age, until the observer caught up). On SIGTERM
the node stops polling, unregisters its subscribers together (their sources move now),
stops the broker and exits with code 0; if that takes longer than
``shutdown_timeout`` it prints its task stacks to stderr, stops anyway and exits
with code 1 (at once, if its tasks do not end when cancelled). SIGUSR1 prints the
task stacks. It prints ``ready`` once running, and logs warnings and the broker's
decisions to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from eventmill.backends.base import ConsumerTransaction
from eventmill.backends.postgres import PostgresBackend
from eventmill.broker.distributed import DistributedEventBroker, DistributedEventBrokerSettings
from eventmill.consumers.processors import (
    EventProcessor,
    Processor,
    TransactionalEventProcessor,
)
from eventmill.consumers.source_consumer import ConsumerSettings
from eventmill.consumers.subscription_consumer import EventSubscriptionConsumer
from eventmill.errors import LifecycleError, StorageError
from eventmill.events import (
    CategoryPartitionIdentifier,
    EventSourceIdentifier,
    StoredEvent,
    source_key,
)
from eventmill.services.error_handlers import (
    ErrorHandlingService,
    ExponentialBackoff,
    RetryErrorHandler,
)
from eventmill.services.polling import PollingService
from eventmill.services.service import CallableService

TABLES = """
CREATE TABLE IF NOT EXISTS {schema}.processed (
    group_name text NOT NULL, source_key text NOT NULL, event_id text NOT NULL,
    sequence_number bigint NOT NULL, subscriber_id text NOT NULL, node_id text NOT NULL,
    epoch bigint NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS {schema}.node_log (
    node_id text NOT NULL, is_leader boolean NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp())
"""
"""The tables the nodes record into (``{schema}`` is filled in by ``backend.sql``)."""

_INSERT = (
    "INSERT INTO {schema}.processed (group_name, source_key, event_id, sequence_number,"
    " subscriber_id, node_id, epoch)"
    " SELECT %s, %s, unnest(%s::text[]), unnest(%s::bigint[]), %s, %s, %s"
)


_CLOSE_TIMEOUT = 5.0
"""Seconds a stopping node waits for its tasks to end and for its pool to close."""
_RECANCEL_AFTER = 0.2
"""Seconds after which a task that outlived its cancellation is cancelled again."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupConfig:
    """A subscriber group: ``partitions`` partitions of ``category``."""

    group: str
    category: str
    partitions: int
    transactional: bool = True

    def requests(self) -> list[EventSourceIdentifier]:
        """The group's sources."""
        return [
            CategoryPartitionIdentifier(self.category, partition, self.partitions)
            for partition in range(self.partitions)
        ]


class RecordingSubscriber(EventSubscriptionConsumer):
    """An EventSubscriptionConsumer remembering the epoch each source was last accepted
    under, so a batch still in flight while its source is withdrawn is recorded with
    the epoch it was processed under."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.accepted: dict[EventSourceIdentifier, int] = {}

    async def accept(self, source: EventSourceIdentifier, epoch: int) -> None:
        self.accepted[source] = max(epoch, self.accepted.get(source, epoch))
        await super().accept(source, epoch)


class _Recorder:
    """Inserts the ``processed`` rows of one source of one subscriber."""

    def __init__(
        self,
        backend: PostgresBackend,
        subscriber: RecordingSubscriber,
        source: EventSourceIdentifier,
        node_id: str,
    ) -> None:
        self.backend = backend
        self.subscriber = subscriber
        self.source = source
        self.key = source_key(source)
        self.node_id = node_id
        self.insert = backend.sql(_INSERT)

    def row(self, events: Sequence[StoredEvent]) -> tuple[Any, ...]:
        return (
            self.subscriber.group,
            self.key,
            [event.id for event in events],
            [event.sequence_number for event in events],
            self.subscriber.id,
            self.node_id,
            self.subscriber.accepted[self.source],
        )


class TransactionalRecorder(_Recorder, TransactionalEventProcessor):
    """Records a batch in its checkpoint transaction."""

    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        connection = transaction.connection
        assert connection is not None  # PostgreSQL
        await connection.execute(self.insert, self.row(events))


class AtLeastOnceRecorder(_Recorder, EventProcessor):
    """Records each event at once, before its checkpoint is saved."""

    async def process_event(self, event: StoredEvent) -> None:
        async with self.backend.connection() as connection:
            await connection.execute(self.insert, self.row([event]))


async def run_node(config: dict[str, Any]) -> None:
    """Run one node as ``config`` says until SIGTERM (or cancellation)."""
    node_id: str = config["node_id"]
    # Warnings, and the broker's decisions (assigned, revoking, withdrew, accepted,
    # leading), on stderr, which pytest shows when a test fails.
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING,
        format=f"%(asctime)s {node_id} %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("eventmill.broker").setLevel(logging.INFO)
    settings = DistributedEventBrokerSettings(
        **{name: timedelta(seconds=value) for name, value in config["settings"].items()}
    )
    groups = [GroupConfig(**group) for group in config["groups"]]
    poll_interval = timedelta(seconds=config.get("poll_interval", 1.0))
    backend = await PostgresBackend.connect(
        config["dsn"], schema=config["schema"], min_size=1, max_size=config.get("pool_size", 3)
    )
    shutdown_timeout = config.get("shutdown_timeout", 10.0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    graceful = True
    try:
        broker = DistributedEventBroker(backend, node_id=node_id, settings=settings)
        subscribers = [_subscriber(backend, group, node_id, config) for group in groups]
        async with asyncio.TaskGroup() as tasks:
            broker_task = tasks.create_task(broker.execute())
            log_task = tasks.create_task(_log_leadership(backend, broker))
            polling = [
                tasks.create_task(_poll(subscriber, broker, poll_interval))
                for subscriber in subscribers
            ]
            for subscriber in subscribers:
                await broker.register(subscriber)
            await broker.wait_ready()
            print("ready", flush=True)
            await stop.wait()
            stopping = tasks.create_task(_stop_gracefully(broker, subscribers, polling))
            await asyncio.wait([stopping], timeout=shutdown_timeout)
            if not stopping.done():
                graceful = False
                print(f"{node_id}: graceful stop timed out; tasks:", file=sys.stderr)
                dump_tasks()
            try:
                await asyncio.wait_for(
                    _cancel_all([stopping, broker_task, log_task, *polling]), _CLOSE_TIMEOUT
                )
            except TimeoutError:
                print(f"{node_id}: tasks outlived their cancellation:", file=sys.stderr)
                dump_tasks()
                os._exit(1)  # nothing left to do cleanly; never hang
    finally:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await backend.close()
    if not graceful:
        raise LifecycleError(f"{node_id}: graceful stop took over {shutdown_timeout}s")


async def _stop_gracefully(
    broker: DistributedEventBroker,
    subscribers: Sequence[EventSubscriptionConsumer],
    polling: Sequence[asyncio.Task[None]],
) -> None:
    await _cancel_all(polling)  # stop polling new work; in-flight passes end here
    # Withdraw, release, forget: every subscriber at once, as eventmill.node does. One
    # after the other, each waited for the heartbeat under way and for its statements
    # behind the others': fifty groups took a third longer to stop (2.9 s against 1.96
    # s, medians, load average about 10), over 10 s once on a loaded machine.
    async with asyncio.TaskGroup() as unregistering:
        for subscriber in subscribers:
            unregistering.create_task(broker.unregister(subscriber))


def _subscriber(
    backend: PostgresBackend, group: GroupConfig, node_id: str, config: dict[str, Any]
) -> RecordingSubscriber:
    subscriber: RecordingSubscriber

    def make_processor(source: EventSourceIdentifier) -> Processor:
        kind = TransactionalRecorder if group.transactional else AtLeastOnceRecorder
        return kind(backend, subscriber, source, node_id)

    subscriber = RecordingSubscriber(
        backend,
        group=group.group,
        id=f"{group.group}@{node_id}",
        subscription_requests=group.requests(),
        processor_factory=make_processor,
        settings=ConsumerSettings(checkpoint_every=config.get("checkpoint_every", 10)),
    )
    return subscriber


async def _poll(
    subscriber: EventSubscriptionConsumer, broker: DistributedEventBroker, interval: timedelta
) -> None:
    async def guarded_pass() -> int:
        return await subscriber.consume_all() if broker.is_current else 0

    handler: RetryErrorHandler[int] = RetryErrorHandler(
        backoff=ExponentialBackoff(initial=timedelta(milliseconds=50), maximum=timedelta(seconds=2))
    )
    polling = PollingService(ErrorHandlingService(CallableService(guarded_pass), handler), interval)
    remove = subscriber.on_new_events(polling.wake)
    try:
        await polling.execute()
    finally:
        remove()


async def _cancel_all(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until they are done, cancelling again any that went on:
    Python 3.11's ``asyncio.wait_for`` (inside the connection pool) loses a cancellation
    that races a connection being handed over."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=_RECANCEL_AFTER)


def dump_tasks() -> None:
    """Print where every task waits (its chain of awaited coroutines) to stderr;
    NodeSet sends SIGUSR1 before it kills a node that did not stop in time, so a hang
    shows where it is."""
    for task in asyncio.all_tasks():
        print(
            f"task {task.get_name()}{' (cancelling)' if task.cancelling() else ''}:",
            file=sys.stderr,
        )
        awaited: Any = task.get_coro()
        while awaited is not None:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
            if frame is not None:
                code = frame.f_code
                print(f"  {code.co_filename}:{frame.f_lineno} {code.co_name}", file=sys.stderr)
            else:
                print(f"  {awaited!r:.200}", file=sys.stderr)
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
    sys.stderr.flush()


async def _log_leadership(backend: PostgresBackend, broker: DistributedEventBroker) -> None:
    insert = backend.sql("INSERT INTO {schema}.node_log (node_id, is_leader) VALUES (%s, %s)")
    leading = False
    while True:
        if broker.is_leader != leading:
            leading = broker.is_leader
            with contextlib.suppress(StorageError):
                async with backend.connection() as connection:
                    await connection.execute(insert, (broker.node_id, leading))
        await asyncio.sleep(0.02)


if __name__ == "__main__":
    asyncio.run(run_node(json.loads(sys.argv[1])))

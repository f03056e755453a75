"""Fault injection for multi-process tests on PostgreSQL.

::

    server = PrivateCluster.create()                 # tests/servers.py
    async with FaultCluster(server.dsn(), schema, server=server,
                            groups=[FaultGroup(group="g", category="c")],
                            settings=FaultNodeSettings()) as cluster:
        await cluster.start("node-1")
        schedule = FaultSchedule.generate(seed, duration=timedelta(seconds=30), nodes=[...])
        await cluster.inject(schedule)               # while a Publisher publishes
        await cluster.wait_quiescent(timeout=timedelta(seconds=60))
        report = await cluster.check()               # report.violations must be empty

Each node is a ``python -m tests.harness.faults CONFIG_JSON`` process running an
``EventProcessingNode`` (distributed broker). Its connections carry the application
name ``<schema>/<node id>``, so the harness can count and terminate them. It records

- ``processed``: one row per processed event with the source, epoch, database clock
  and the node's wall clock when its processing began; transactional groups insert
  it in the batch's checkpoint transaction (exactly-once), the others in a statement
  of its own before the checkpoint (at-least-once);

and prints one JSON line per ``report_interval`` on stdout: node status, component
health, thread and task counts, resident memory. Log records (WARNING and up) go to
stderr, one line each; the harness counts them. A trigger installed by the harness
copies every checkpoint write into ``checkpoint_history``.

The library reads no environment; tests choose the seed (print it so a failure can be
replayed).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg
from psycopg.conninfo import make_conninfo

from eventmill.backends.base import ConsumerTransaction
from eventmill.backends.postgres import PostgresBackend
from eventmill.backends.postgres.subscribers import HEARTBEAT_CONNECTIONS
from eventmill.broker.distributed import DistributedEventBrokerSettings
from eventmill.consumers.lease import lease_margin
from eventmill.consumers.processors import EventProcessor, Processor, TransactionalEventProcessor
from eventmill.errors import ConflictError, LifecycleError, StorageError
from eventmill.events import (
    CategoryIdentifier,
    CategoryPartitionIdentifier,
    EventSourceIdentifier,
    NewEvent,
    StoredEvent,
    source_key,
)
from eventmill.node import EventProcessingNode, NodeMode, NodeSettings, SubscriberHandle
from eventmill.services.error_handlers import (
    ExponentialBackoff,
    RetryErrorHandler,
    TypeMappingErrorHandler,
)
from eventmill.store import EventStore
from tests.servers import PrivateCluster

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
"""The repository, the working directory of node processes (``-m tests...``)."""

TABLES = """
CREATE TABLE IF NOT EXISTS {schema}.processed (
    group_name text NOT NULL, source_key text NOT NULL, event_id text NOT NULL,
    node_id text NOT NULL, epoch bigint NOT NULL, began timestamptz NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS {schema}.checkpoint_history (
    id bigserial PRIMARY KEY, group_name text NOT NULL, source_key text NOT NULL,
    after_place bigint, epoch bigint NOT NULL, version bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE OR REPLACE FUNCTION {schema}.record_checkpoint() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('INSERT INTO %I.checkpoint_history'
                   ' (group_name, source_key, after_place, epoch, version)'
                   ' VALUES ($1, $2, $3, $4, $5)', TG_TABLE_SCHEMA)
        USING NEW.group_name, NEW.source_key, NEW.after_place, NEW.epoch, NEW.version;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER record_checkpoint AFTER INSERT OR UPDATE ON {schema}.checkpoints
    FOR EACH ROW EXECUTE FUNCTION {schema}.record_checkpoint()
"""
"""The harness's tables and trigger (``{schema}`` is filled in by ``backend.sql``)."""

_INSERT = (
    "INSERT INTO {schema}.processed (group_name, source_key, event_id, node_id, epoch, began)"
    " SELECT %s, %s, unnest(%s::text[]), %s, %s, %s"
)


# --- configuration ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultGroup:
    """A subscriber group over ``category``: its ``partitions`` partitions (1: the
    category whole); ``transactional`` groups record exactly-once."""

    group: str
    category: str
    partitions: int = 1
    transactional: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultNodeSettings:
    """How the node processes run: short intervals so failover is quick."""

    poll_interval: timedelta = timedelta(milliseconds=300)
    checkpoint_interval: int = 10
    heartbeat_interval: timedelta = timedelta(milliseconds=200)
    purge_interval: timedelta = timedelta(milliseconds=500)
    subscriber_max_age: timedelta = timedelta(milliseconds=1500)
    distribution_interval: timedelta = timedelta(milliseconds=100)
    synchronisation_interval: timedelta = timedelta(milliseconds=100)
    retry_maximum: timedelta = timedelta(seconds=2)
    """The longest wait between retries of a pass failed by storage errors or lost
    checkpoint races (anything else stops the node)."""
    pool_size: int = 3
    report_interval: timedelta = timedelta(milliseconds=250)

    def to_json(self) -> dict[str, Any]:
        """Durations in seconds, the rest as is."""
        return {
            name: value.total_seconds() if isinstance(value, timedelta) else value
            for name, value in ((name, getattr(self, name)) for name in self.__slots__)
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FaultNodeSettings:
        """The inverse of ``to_json``."""
        defaults = cls()
        values: dict[str, Any] = {
            name: value if isinstance(getattr(defaults, name), int) else timedelta(seconds=value)
            for name, value in data.items()
        }
        return cls(**values)


# --- the node process ---------------------------------------------------------------


def _source_of(
    known: dict[EventSourceIdentifier, int], event: StoredEvent
) -> tuple[EventSourceIdentifier, int]:
    """The source ``event`` was read from, and its epoch (-1 if none is known)."""
    for source, epoch in known.items():
        if isinstance(source, CategoryPartitionIdentifier):
            if source.contains(event.stream):
                return source, epoch
        elif isinstance(source, CategoryIdentifier):
            return source, epoch
    return CategoryIdentifier(event.category), -1


class _Recorder:
    def __init__(self, backend: PostgresBackend, group: str, node_id: str) -> None:
        self.backend = backend
        self.group = group
        self.node_id = node_id
        self.insert = backend.sql(_INSERT)
        self.handle: SubscriberHandle | None = None
        self.known: dict[EventSourceIdentifier, int] = {}
        """The sources held so far and their latest epochs: a batch still in flight
        while its source is withdrawn is no longer among the held ones."""

    def rows(self, events: Sequence[StoredEvent], began: datetime) -> tuple[Any, ...]:
        assert self.handle is not None
        self.known.update(self.handle.subscriber.sources)
        source, epoch = _source_of(self.known, events[0])
        ids = [e.id for e in events]
        return (self.group, source_key(source), ids, self.node_id, epoch, began)


class TransactionalRecorder(_Recorder, TransactionalEventProcessor):
    """Records a batch in its checkpoint transaction (exactly-once)."""

    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        began = datetime.now(UTC)
        connection = transaction.connection
        assert connection is not None  # PostgreSQL
        await connection.execute(self.insert, self.rows(events, began))


class AtLeastOnceRecorder(_Recorder, EventProcessor):
    """Records each event in a statement of its own, before the checkpoint."""

    async def process_event(self, event: StoredEvent) -> None:
        began = datetime.now(UTC)
        async with self.backend.connection() as connection:
            await connection.execute(self.insert, self.rows([event], began))


def _resident_kb() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


async def _report(node: EventProcessingNode, interval: float) -> None:
    while True:
        line = {
            "node": node.node_id,
            "status": node.status.value,
            "health": {name: status.value for name, status in node.health().items()},
            "threads": threading.active_count(),
            "tasks": len(asyncio.all_tasks()),
            "rss_kb": _resident_kb(),
            "time": time.time(),
        }
        print(json.dumps(line), flush=True)
        await asyncio.sleep(interval)


async def _connect_backend(
    dsn: str, schema: str, pool_size: int, direct_dsn: str | None
) -> PostgresBackend:
    """Connect (the pool over ``dsn``, sessions over ``direct_dsn`` if given), retrying
    with backoff while the database is away."""
    delay = 0.1
    while True:
        try:
            return await PostgresBackend.connect(
                dsn,
                schema=schema,
                min_size=1,
                max_size=pool_size,
                connect_timeout=timedelta(seconds=5),
                direct_dsn=direct_dsn,
            )
        except StorageError as error:
            logger.warning("node cannot connect yet: %s", error)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def run_node(config: dict[str, Any]) -> None:
    """Run one fault-test node as ``config`` says until SIGTERM."""
    node_id: str = config["node_id"]
    settings = FaultNodeSettings.from_json(config["settings"])
    dsn = make_conninfo(config["dsn"], application_name=f"{config['schema']}/{node_id}")
    backend = await _connect_backend(
        dsn, config["schema"], settings.pool_size, config["direct_dsn"]
    )
    try:
        retry: RetryErrorHandler[Any] = RetryErrorHandler(
            backoff=ExponentialBackoff(maximum=settings.retry_maximum)
        )
        node = EventProcessingNode(
            backend,
            mode=NodeMode(config.get("mode", "both")),
            node_id=node_id,
            settings=NodeSettings(
                poll_interval=settings.poll_interval,
                checkpoint_interval=settings.checkpoint_interval,
                error_handler=TypeMappingErrorHandler({(StorageError, ConflictError): retry}),
                shutdown_timeout=timedelta(seconds=5),
                broker_settings=DistributedEventBrokerSettings(
                    subscriber_manager_heartbeat_interval=settings.heartbeat_interval,
                    subscriber_manager_purge_interval=settings.purge_interval,
                    subscriber_manager_subscriber_max_age=settings.subscriber_max_age,
                    coordinator_distribution_interval=settings.distribution_interval,
                    observer_synchronisation_interval=settings.synchronisation_interval,
                ),
            ),
        )
        for group in (FaultGroup(**g) for g in config["groups"]):
            kind = TransactionalRecorder if group.transactional else AtLeastOnceRecorder
            recorder: _Recorder = kind(backend, group.group, node_id)
            processor: Processor = recorder  # type: ignore[assignment]
            recorder.handle = node.register_subscriber(
                group=group.group,
                source=CategoryIdentifier(group.category),
                processor=processor,
                partitions=group.partitions if group.partitions > 1 else None,
            )
        loop = asyncio.get_running_loop()
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(number, node.stop)
        reporter = loop.create_task(_report(node, settings.report_interval.total_seconds()))
        try:
            await node.run()
        finally:
            reporter.cancel()
    finally:
        await backend.close()


def main() -> None:
    """``python -m tests.harness.faults CONFIG_JSON``."""
    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING, format="%(asctime)s %(name)s %(message)s"
    )
    asyncio.run(run_node(json.loads(sys.argv[1])))


# --- the schedule -------------------------------------------------------------------


class FaultKind(enum.Enum):
    """What a scheduled fault does."""

    KILL = "kill"
    """SIGKILL a node, then start a replacement with the same id."""
    FREEZE = "freeze"
    """SIGSTOP a node for longer than the subscriber max age, then SIGCONT it."""
    TERMINATE = "terminate"
    """``pg_terminate_backend`` of random connections of the nodes."""
    RESTART = "restart"
    """Restart the PostgreSQL server (the cluster's private one)."""


@dataclass(frozen=True, slots=True)
class Fault:
    """One scheduled fault, ``at`` seconds after the schedule starts."""

    at: float
    kind: FaultKind
    target: str | None = None
    """The node (KILL, FREEZE)."""
    count: int = 1
    """Connections to terminate (TERMINATE)."""


@dataclass(frozen=True, slots=True)
class FaultSchedule:
    """Faults in time order, drawn from a seed."""

    seed: int
    faults: tuple[Fault, ...]

    @classmethod
    def generate(
        cls,
        seed: int,
        *,
        duration: timedelta,
        nodes: Sequence[str],
        mean_gap: timedelta = timedelta(seconds=2),
        kinds: Sequence[FaultKind] = tuple(FaultKind),
        weights: Sequence[float] | None = None,
        restarts: int | None = None,
    ) -> FaultSchedule:
        """Faults at exponential gaps of ``mean_gap`` over ``duration``, each of a kind
        drawn from ``kinds`` (with ``weights``) against a random node. ``restarts``: at
        most this many server restarts (None: no limit)."""
        rng = random.Random(seed)
        faults: list[Fault] = []
        at = rng.expovariate(1 / mean_gap.total_seconds())
        restarted = 0
        while at < duration.total_seconds():
            kind = rng.choices(list(kinds), weights=weights)[0]
            if kind is FaultKind.RESTART and restarts is not None and restarted >= restarts:
                kind = FaultKind.TERMINATE
            restarted += kind is FaultKind.RESTART
            faults.append(Fault(at, kind, rng.choice(list(nodes)), rng.randint(1, 3)))
            at += max(0.2, rng.expovariate(1 / mean_gap.total_seconds()))
        return cls(seed, tuple(faults))

    def counts(self) -> dict[str, int]:
        """How many faults of each kind."""
        found = Counter(fault.kind.value for fault in self.faults)
        return {kind.value: found[kind.value] for kind in FaultKind}


# --- the cluster --------------------------------------------------------------------


@dataclass(slots=True)
class NodeProcess:
    """A node process and what it reported."""

    node_id: str
    process: asyncio.subprocess.Process = field(repr=False)
    started: float = field(default_factory=time.monotonic)
    reports: list[dict[str, Any]] = field(default_factory=list, repr=False)
    """The latest status lines (at most 200)."""
    first: dict[str, Any] | None = field(default=None, repr=False)
    """The first status line."""
    log_lines: list[tuple[float, str]] = field(default_factory=list, repr=False)
    """Each stderr line with the monotonic time it arrived."""
    readers: list[asyncio.Task[None]] = field(default_factory=list, repr=False)

    @property
    def latest(self) -> dict[str, Any] | None:
        """The last status line, or None."""
        return self.reports[-1] if self.reports else None

    @property
    def healthy(self) -> bool:
        """Its last report says RUNNING or WAITING."""
        latest = self.latest
        return latest is not None and latest["status"] in ("running", "waiting")


@dataclass(slots=True)
class FaultReport:
    """What ``FaultCluster.check`` found."""

    events: dict[str, int]
    """Committed events per group's category."""
    duplicates: dict[str, int]
    """Processing rows beyond one per event, per group."""
    duplicate_bound: dict[str, int]
    """The most duplicates the guarantees allow, per group."""
    zombie_events: dict[str, int]
    """Per group, events a stale holder began to process (under its old epoch) after
    the new holder had begun: none allowed (the ownership lease ends a woken zombie's
    pass before its next event)."""
    in_flight_events: dict[str, int]
    """Per group, events a stale holder recorded after the new holder had begun whose
    processing began before a pause longer than the ownership lease (in flight when
    the node froze, or waiting for the database through a restart): no lease can call
    those back, so an at-least-once group may have one per subscriber and such fault
    (transactional groups roll them back: none allowed)."""
    connections: dict[str, int]
    """Connections per node (pg_stat_activity)."""
    violations: list[str]
    """Broken guarantees, in words; empty when all held."""

    def to_json(self) -> dict[str, Any]:
        """The report as plain values."""
        return asdict(self)


class FaultCluster:
    """Node processes on one schema of ``dsn``, the faults injected into them and the
    checks of the guarantees afterwards; see the module docstring. ``server`` is the
    private cluster (tests/servers.py) ``dsn`` leads to, directly or through a
    PgBouncer: the one RESTART faults and ``server_stopped`` stop, never the machine's
    shared server. With ``direct_dsn`` every backend (the nodes' and the harness's)
    keeps its pool on ``dsn`` and its sessions on ``direct_dsn``
    (``PostgresBackend.connect``). Leaving the block kills the nodes still running and starts the
    server again if a fault left it down."""

    def __init__(
        self,
        dsn: str,
        schema: str,
        *,
        server: PrivateCluster,
        direct_dsn: str | None = None,
        groups: Sequence[FaultGroup],
        settings: FaultNodeSettings | None = None,
        ready_timeout: timedelta = timedelta(seconds=30),
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self.server = server
        self.direct_dsn = direct_dsn
        self.groups = list(groups)
        self.settings = settings or FaultNodeSettings()
        self.ready_timeout = ready_timeout.total_seconds()
        self.nodes: dict[str, NodeProcess] = {}
        self.injected: Counter[str] = Counter()
        """Faults injected so far, by kind."""
        self.terminated = 0
        """Connections terminated so far."""
        self.backend: PostgresBackend | None = None
        self._ended: list[NodeProcess] = []

    async def __aenter__(self) -> Self:
        self.backend = await _connect_backend(
            make_conninfo(self.dsn, application_name=f"{self.schema}-harness"),
            self.schema,
            2,
            self.direct_dsn,
        )
        await self.backend.install_schema()
        async with self.backend.connection() as connection:
            await connection.execute(self.backend.sql(TABLES))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            for node_id in list(self.nodes):
                await self.kill(node_id)
        finally:
            if not await asyncio.to_thread(self.server.running):
                await asyncio.to_thread(self.server.start)
            if self.backend is not None:
                await self.backend.close()

    @property
    def store(self) -> EventStore:
        """An event store on the harness's backend."""
        assert self.backend is not None
        return EventStore(self.backend)

    # --- processes ---

    async def start(self, node_id: str, *, wait: bool = True) -> NodeProcess:
        """Start a node; with ``wait``, return once it reports RUNNING or WAITING.
        Raises LifecycleError when it exits or is not healthy in time."""
        config = {
            "node_id": node_id,
            "dsn": self.dsn,
            "direct_dsn": self.direct_dsn,
            "schema": self.schema,
            "groups": [asdict(group) for group in self.groups],
            "settings": self.settings.to_json(),
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.harness.faults",
            json.dumps(config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        node = NodeProcess(node_id, process)
        node.readers = [
            asyncio.get_running_loop().create_task(self._read_reports(node)),
            asyncio.get_running_loop().create_task(self._read_log(node)),
        ]
        self.nodes[node_id] = node
        if wait:
            await self.wait_healthy([node_id], timeout=timedelta(seconds=self.ready_timeout))
        return node

    async def _read_reports(self, node: NodeProcess) -> None:
        assert node.process.stdout is not None
        async for line in node.process.stdout:
            with contextlib.suppress(ValueError):
                node.reports.append(json.loads(line))
                del node.reports[:-200]
                node.first = node.first or node.reports[0]

    async def _read_log(self, node: NodeProcess) -> None:
        assert node.process.stderr is not None
        async for line in node.process.stderr:
            node.log_lines.append((time.monotonic(), line.decode(errors="replace").rstrip()))

    async def wait_healthy(
        self,
        node_ids: Sequence[str] | None = None,
        *,
        timeout: timedelta,  # noqa: ASYNC109
    ) -> None:
        """Block until the nodes (default: all) report RUNNING or WAITING, each in a
        report made after this call. Raises LifecycleError when one exits or after
        ``timeout``."""
        since = time.time()
        ids = list(self.nodes) if node_ids is None else list(node_ids)
        deadline = time.monotonic() + timeout.total_seconds()
        while True:
            waiting = []
            for node_id in ids:
                node = self.nodes[node_id]
                if node.process.returncode is not None:
                    raise LifecycleError(
                        f"{node_id} exited with {node.process.returncode}: "
                        + "\n".join(line for _, line in node.log_lines[-20:])
                    )
                latest = node.latest
                if not (node.healthy and latest is not None and latest["time"] >= since):
                    waiting.append(node_id)
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise LifecycleError(
                    f"not healthy in time: {', '.join(waiting)} "
                    f"({[self.nodes[n].latest for n in waiting]})"
                )
            await asyncio.sleep(0.05)

    async def stop(self, node_id: str, timeout: float = 30) -> int:  # noqa: ASYNC109
        """Stop a node gracefully (SIGTERM; SIGCONT first) and return its exit code."""
        node = self.nodes.pop(node_id)
        with contextlib.suppress(ProcessLookupError):
            node.process.send_signal(signal.SIGCONT)
            node.process.terminate()
        try:
            async with asyncio.timeout(timeout):
                code = await node.process.wait()
        except TimeoutError:
            node.process.kill()
            code = await node.process.wait()
        await self._finish(node)
        return code

    async def kill(self, node_id: str) -> int:
        """SIGKILL a node and return its exit code."""
        node = self.nodes.pop(node_id)
        with contextlib.suppress(ProcessLookupError):
            node.process.kill()
        code = await node.process.wait()
        await self._finish(node)
        return code

    async def _finish(self, node: NodeProcess) -> None:
        await asyncio.wait(node.readers, timeout=5)
        for reader in node.readers:
            reader.cancel()
        self._ended.append(node)

    def freeze(self, node_id: str) -> None:
        """SIGSTOP a node."""
        self.nodes[node_id].process.send_signal(signal.SIGSTOP)

    def thaw(self, node_id: str) -> None:
        """SIGCONT a node."""
        self.nodes[node_id].process.send_signal(signal.SIGCONT)

    # --- faults ---

    @contextlib.asynccontextmanager
    async def server_stopped(self) -> AsyncIterator[None]:
        """Stop the PostgreSQL server for the block (fast shutdown: every connection
        ends) and start it again afterwards, whatever happens in the block. Blocks until
        it is down, and at the end until it accepts connections. Raises ServerError."""
        await asyncio.to_thread(self.server.stop)
        try:
            yield
        finally:
            await asyncio.to_thread(self.server.start)

    async def _node_connections(self) -> list[tuple[int, str]]:
        """(pid, application name) of the nodes' connections."""
        prefix = f"{self.schema}/"
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as connection:
            rows = await (
                await connection.execute(
                    "SELECT pid, application_name FROM pg_stat_activity"
                    " WHERE starts_with(application_name, %s) ORDER BY pid",
                    (prefix,),
                )
            ).fetchall()
        return [(pid, name) for pid, name in rows]

    async def terminate_connections(self, rng: random.Random, count: int) -> int:
        """``pg_terminate_backend`` of ``count`` random node connections; how many."""
        found = await self._node_connections()
        chosen = rng.sample(found, min(count, len(found)))
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as connection:
            for pid, _ in chosen:
                await connection.execute("SELECT pg_terminate_backend(%s)", (pid,))
        self.terminated += len(chosen)
        return len(chosen)

    async def connections(self) -> dict[str, int]:
        """Open connections per node id."""
        found: Counter[str] = Counter()
        for _, name in await self._node_connections():
            found[name.split("/", 1)[1]] += 1
        return dict(found)

    async def inject(self, schedule: FaultSchedule) -> None:
        """Apply ``schedule``'s faults at their times (a FREEZE lasts twice the
        subscriber max age; a KILL starts a replacement under the same id at once)."""
        rng = random.Random(schedule.seed)
        begun = time.monotonic()
        frozen = 2 * self.settings.subscriber_max_age.total_seconds()
        thawing: list[asyncio.Task[None]] = []
        try:
            for fault in schedule.faults:
                await asyncio.sleep(max(0.0, begun + fault.at - time.monotonic()))
                await self.apply(fault, rng, frozen, thawing)
        finally:
            await asyncio.gather(*thawing)

    async def apply(
        self,
        fault: Fault,
        rng: random.Random,
        frozen_for: float,
        thawing: list[asyncio.Task[None]],
    ) -> None:
        """Apply one fault now (see ``inject``)."""
        target = fault.target
        if fault.kind is FaultKind.KILL and target in self.nodes:
            await self.kill(target)
            await self.start(target, wait=False)
        elif fault.kind is FaultKind.FREEZE and target in self.nodes:
            if any(not t.done() for t in thawing):
                return  # one zombie at a time keeps the others' failover in the budget
            self.freeze(target)

            async def thaw_later(node_id: str) -> None:
                await asyncio.sleep(frozen_for)
                if node_id in self.nodes:
                    self.thaw(node_id)

            thawing.append(asyncio.get_running_loop().create_task(thaw_later(target)))
        elif fault.kind is FaultKind.TERMINATE:
            await self.terminate_connections(rng, fault.count)
        elif fault.kind is FaultKind.RESTART:
            async with self.server_stopped():
                pass
        else:
            return
        self.injected[fault.kind.value] += 1

    # --- checks ---

    async def _query(self, text: str, *params: Any) -> list[tuple[Any, ...]]:
        assert self.backend is not None
        async with self.backend.connection() as connection:
            return await (await connection.execute(self.backend.sql(text), params)).fetchall()

    async def committed(self, category: str) -> set[str]:
        """The ids of the committed events of ``category``."""
        rows = await self._query(
            "SELECT id::text FROM {schema}.events WHERE category = %s", category
        )
        return {row[0] for row in rows}

    async def processed_counts(self, group: str) -> Counter[str]:
        """How often each event id was processed by ``group``."""
        rows = await self._query(
            "SELECT event_id, count(*) FROM {schema}.processed WHERE group_name = %s"
            " GROUP BY event_id",
            group,
        )
        return Counter({event_id: count for event_id, count in rows})

    async def wait_quiescent(self, timeout: timedelta) -> None:  # noqa: ASYNC109
        """Block until every group processed every committed event of its category and
        every node is healthy. Raises LifecycleError after ``timeout``."""
        deadline = time.monotonic() + timeout.total_seconds()
        missing: dict[str, int] = {}
        while time.monotonic() < deadline:
            missing = {}
            for group in self.groups:
                committed = await self.committed(group.category)
                left = committed - set(await self.processed_counts(group.group))
                if left:
                    missing[group.group] = len(left)
            if not missing:
                remaining = max(0.1, deadline - time.monotonic())
                await self.wait_healthy(timeout=timedelta(seconds=remaining))
                return
            await asyncio.sleep(0.2)
        raise LifecycleError(f"not quiescent in time: events missing per group {missing}")

    async def check(self) -> FaultReport:
        """Check every guarantee over what was recorded; see FaultReport."""
        violations: list[str] = []
        events: dict[str, int] = {}
        duplicates: dict[str, int] = {}
        bounds: dict[str, int] = {}
        faults = sum(self.injected.values()) + self.terminated
        for group in self.groups:
            committed = await self.committed(group.category)
            counts = await self.processed_counts(group.group)
            events[group.group] = len(committed)
            missed = committed - set(counts)
            if missed:
                violations.append(f"{group.group}: {len(missed)} committed events missed")
            unknown = set(counts) - committed
            if unknown:
                violations.append(f"{group.group}: {len(unknown)} unknown events processed")
            extra = sum(count - 1 for count in counts.values())
            duplicates[group.group] = extra
            epochs = await self._query(
                "SELECT count(DISTINCT (source_key, epoch)) FROM {schema}.checkpoint_history"
                " WHERE group_name = %s",
                group.group,
            )
            if group.transactional:
                bounds[group.group] = 0
            else:
                # Each fault or handover replays at most twice the checkpoint interval
                # per source (the batch whose save was in flight and the current one).
                bounds[group.group] = (
                    2
                    * self.settings.checkpoint_interval
                    * (epochs[0][0] + faults * group.partitions)
                )
            if extra > bounds[group.group]:
                violations.append(
                    f"{group.group}: {extra} duplicates, more than the bound {bounds[group.group]}"
                )
        zombies, in_flight = await self._check_epochs(violations)
        for group in self.groups:
            if zombies[group.group]:
                violations.append(
                    f"{group.group}: {zombies[group.group]} events begun by a stale "
                    "holder after a newer one had begun"
                )
            allowed = self.injected[FaultKind.FREEZE.value] + self.injected[
                FaultKind.RESTART.value
            ] * len(self.nodes)
            if group.transactional:
                allowed = 0
            if in_flight[group.group] > allowed:
                violations.append(
                    f"{group.group}: {in_flight[group.group]} events in flight across a "
                    f"pause recorded by a stale holder after a newer one (allowed {allowed})"
                )
        violations += await self._check_checkpoints()
        connections = await self.connections()
        # The pool, the LISTEN and the lock connections, and the heartbeats' own.
        limit = self.settings.pool_size + 2 + HEARTBEAT_CONNECTIONS
        for node_id, count in connections.items():
            if count > limit:
                violations.append(f"{node_id}: {count} connections, more than {limit}")
        for node_id, node in self.nodes.items():
            if not node.healthy:
                violations.append(f"{node_id} is not healthy: {node.latest}")
        return FaultReport(
            events=events,
            duplicates=duplicates,
            duplicate_bound=bounds,
            zombie_events=dict(zombies),
            in_flight_events=dict(in_flight),
            connections=connections,
            violations=violations,
        )

    async def _check_epochs(self, violations: list[str]) -> tuple[Counter[str], Counter[str]]:
        """Per (group, source), processing in database-clock order going back to an
        older epoch (two holders processed one source at the same time): counted per
        group, apart (second counter) when that event's processing began longer than
        the ownership lease before it was recorded (it was in flight across a pause);
        each described in ``violations`` if it was an unheld source."""
        rows = await self._query(
            "SELECT group_name, source_key, epoch, node_id, at, began FROM {schema}.processed"
            " ORDER BY group_name, source_key, at"
        )
        max_age = self.settings.subscriber_max_age
        lease = max_age - lease_margin(self.settings.heartbeat_interval, max_age)
        stale: Counter[str] = Counter({group.group: 0 for group in self.groups})
        in_flight: Counter[str] = Counter({group.group: 0 for group in self.groups})
        latest: dict[tuple[str, str], tuple[int, str]] = {}
        for group, key, epoch, node_id, at, began in rows:
            if epoch < 0:
                violations.append(f"{group} {key}: {node_id} processed a source it did not hold")
                continue
            before = latest.get((group, key))
            if before is not None and epoch < before[0]:
                (in_flight if at - began >= lease else stale)[group] += 1
                logger.warning(
                    "%s %s: %s processed under epoch %d at %s after %s under epoch %d",
                    *(group, key, node_id, epoch, at, before[1], before[0]),
                )
            if before is None or epoch >= before[0]:
                latest[(group, key)] = (epoch, node_id)
        return stale, in_flight

    async def _check_checkpoints(self) -> list[str]:
        """No checkpoint moved backwards, and no epoch went down."""
        rows = await self._query(
            "SELECT group_name, source_key, after_place, epoch FROM {schema}.checkpoint_history"
            " ORDER BY id"
        )
        found = []
        last: dict[tuple[str, str], tuple[int | None, int]] = {}
        for group, key, after, epoch in rows:
            before = last.get((group, key))
            if before is not None:
                if after is not None and before[0] is not None and after < before[0]:
                    found.append(f"{group} {key}: checkpoint moved back {before[0]} -> {after}")
                if epoch < before[1]:
                    found.append(f"{group} {key}: epoch went down {before[1]} -> {epoch}")
            last[(group, key)] = (after, epoch)
        return found

    def resources(self) -> dict[str, dict[str, Any]]:
        """Per running node: its process's age in seconds and its first and latest
        thread, task and memory figures."""
        result = {}
        for node_id, node in self.nodes.items():
            first, latest = node.first, node.latest
            if first is not None and latest is not None:
                result[node_id] = {
                    "seconds": round(time.monotonic() - node.started),
                    **{key: [first[key], latest[key]] for key in ("threads", "tasks", "rss_kb")},
                }
        return result


class Publisher:
    """Publishes ``rate`` events a second to random streams of ``category`` until
    stopped; failures (the database away) are counted and the publishing goes on."""

    def __init__(
        self,
        store: EventStore,
        category: str,
        *,
        streams: int = 16,
        rate: float = 50,
        seed: int = 0,
    ) -> None:
        self.store = store
        self.category = category
        self.streams = [f"s-{n}" for n in range(streams)]
        self.interval = 1 / rate
        self.rng = random.Random(seed)
        self.published = 0
        self.failed = 0

    async def run(self) -> None:
        """Publish until cancelled."""
        while True:
            await self.publish_one()
            await asyncio.sleep(self.interval)

    async def publish_one(self) -> None:
        """Publish one event (at most 5 s); count it as published or failed."""
        stream = self.rng.choice(self.streams)
        try:
            async with asyncio.timeout(5):
                await self.store.stream(category=self.category, stream=stream).publish(
                    [NewEvent(name="tick", payload={"n": self.published})]
                )
            self.published += 1
        except (StorageError, TimeoutError):
            self.failed += 1


if __name__ == "__main__":
    main()

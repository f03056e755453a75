"""The demo behind ``eventmill demo``: an order workflow processed by two groups over
the category ``orders`` in 8 partitions, a projection and a reactor, with live
progress and a summary checked against what was published.

- In memory (no DSN), the nodes run inside this process (``run_in_memory``).
- On PostgreSQL, ``run_on_postgres`` installs a fresh schema, starts node processes
  with ``eventmill run eventmill.demo:make_node``, publishes while they work, stops one
  gracefully partway and starts a replacement so the sources visibly move, and reads
  every figure it shows from the database (checkpoints, holdings, projection table),
  never from the processes' output. The schema is dropped at the end.

``make_node`` is the node those processes run: the projection ``OrderSummaries``
commits its states with each batch's checkpoint (exactly once), and the reactor
``ShippingReactor`` requests one shipment per paid order, idempotently.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from eventmill.backends.base import Backend, HoldingState
from eventmill.backends.memory import InMemoryBackend
from eventmill.broker.distributed import DistributedEventBrokerSettings
from eventmill.conditions import stream_is_empty
from eventmill.consumers.processors import EventProcessor
from eventmill.errors import UnmetWriteConditionError
from eventmill.events import CategoryIdentifier, JsonObject, NewEvent, StoredEvent
from eventmill.node import EventProcessingNode, NodeMode, NodeSettings
from eventmill.projections import ProjectionProcessor, ProjectionStore, Projector, handles
from eventmill.store import EventStore

if TYPE_CHECKING:
    from eventmill.backends.postgres import PostgresBackend

EXIT_FAILED = 1
GROUPS = ("order-projection", "shipping-reactor")
PARTITIONS = 8
MAX_NODE_PROCESSES = 8
"""Each node process keeps a pool of up to 4 connections."""
PUBLISHERS = 3
TICK = 0.5
START_TIMEOUT = 30.0
STALL_TIMEOUT = 30.0
"""The demo fails when nothing changes for this long (no event processed, no move)."""
FACTORY = "eventmill.demo:make_node"


# --- the workflow -------------------------------------------------------------------


@dataclass
class OrderFigures:
    """What the published workflow implies, and what the projection must find."""

    orders: int = 0
    items: int = 0
    revenue: int = 0
    paid: int = 0

    @property
    def events(self) -> int:
        """Events of these orders: one placed, one per item, one paid."""
        return self.orders + self.items + self.paid

    def as_text(self) -> str:
        return f"{self.orders} orders, {self.items} items, revenue {self.revenue}, {self.paid} paid"


def plan_orders(events: int) -> tuple[list[tuple[str, list[NewEvent]]], OrderFigures]:
    """About ``events`` events as (stream, batch) per order: placed, 3 items and (three
    orders in four) paid; with the figures they imply."""
    figures = OrderFigures()
    orders = []
    number = 0
    while figures.events < events:
        batch = [NewEvent(name="order-placed", payload={"customer": number % 37})]
        for item in range(3):
            price = (number * 7 + item * 13) % 50 + 1
            batch.append(NewEvent(name="item-added", payload={"price": price}))
            figures.revenue += price
            figures.items += 1
        if number % 4 != 3:
            batch.append(NewEvent(name="order-paid"))
            figures.paid += 1
        figures.orders += 1
        orders.append((f"order-{number}", batch))
        number += 1
    return orders, figures


@dataclass
class Publisher:
    """Publishes planned orders, one batch per order, from ``tasks`` concurrent tasks."""

    store: EventStore
    orders: list[tuple[str, list[NewEvent]]]
    published: int = 0

    async def run(self, tasks: int) -> None:
        """Publish everything; raises what a publish raises."""
        async with asyncio.TaskGroup() as group:
            for first in range(tasks):
                group.create_task(self._publish(self.orders[first::tasks]))

    async def _publish(self, orders: Sequence[tuple[str, list[NewEvent]]]) -> None:
        for number, (stream, batch) in enumerate(orders, 1):
            await self.store.stream(category="orders", stream=stream).publish(
                batch, condition=stream_is_empty()
            )
            self.published += len(batch)
            if number % 20 == 0:
                await asyncio.sleep(0)  # in memory, publishing never yields otherwise


class ShippingReactor(EventProcessor):
    """Requests one shipment per paid order (idempotent: a stream per shipment)."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.processed = 0

    async def process_event(self, event: StoredEvent) -> None:
        if event.name == "order-paid":
            # A replay after a crash or a handover finds the shipment requested already.
            with contextlib.suppress(UnmetWriteConditionError):
                await self.store.stream(category="shipments", stream=event.stream).publish(
                    [NewEvent(name="shipment-requested", payload={"order": event.stream})],
                    condition=stream_is_empty(),
                )
        self.processed += 1


async def count_shipments(store: EventStore) -> int:
    """Events in the category ``shipments``."""
    shipments = 0
    async for _ in store.category("shipments").iterate():
        shipments += 1
    return shipments


def check_summary(
    figures: OrderFigures, found: OrderFigures, shipments: int, elapsed: float
) -> int:
    """Print the summary; return 0 if the projection and reactor agree, else 1."""
    print(
        f"summary: {figures.events} events in {elapsed:.2f}s "
        f"({figures.events / elapsed:,.0f} events/s published and processed by 2 groups)"
    )
    print(f"  published:  {figures.as_text()}")
    print(f"  projection: {found.as_text()}")
    print(f"  reactor:    {shipments} shipments requested")
    if found != figures or shipments != figures.paid:
        print("FAILED: the projection or the reactor disagrees with what was published")
        return EXIT_FAILED
    print("OK: every figure matches the published events")
    return 0


@dataclass
class _Rate:
    last: int = 0
    at: float = field(default_factory=time.perf_counter)

    def update(self, count: int) -> float:
        now = time.perf_counter()
        rate = (count - self.last) / max(now - self.at, 1e-9)
        self.last, self.at = count, now
        return rate


def progress_line(
    started: float, published: int, processed: dict[str, int], rates: dict[str, _Rate]
) -> list[str]:
    """The parts of one progress line: time, published, and per group done/lag/rate."""
    line = [f"{time.perf_counter() - started:5.1f}s published {published:>6}"]
    for group in GROUPS:
        count = processed.get(group, 0)
        rate = rates[group].update(count)
        line.append(f"{group}: {count:>6} done, lag {published - count:>5}, {rate:>7.0f}/s")
    return line


# --- in memory: nodes in this process -----------------------------------------------


class OrderProjection(EventProcessor):
    """Order totals per order, and the figures over all orders (in memory)."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self.paid: set[str] = set()
        self.items = 0
        self.processed = 0

    async def process_event(self, event: StoredEvent) -> None:
        if event.name == "order-placed":
            self.totals.setdefault(event.stream, 0)
        elif event.name == "item-added":
            price = event.payload["price"]
            assert isinstance(price, int)
            self.totals[event.stream] = self.totals.get(event.stream, 0) + price
            self.items += 1
        elif event.name == "order-paid":
            self.paid.add(event.stream)
        self.processed += 1

    def figures(self) -> OrderFigures:
        return OrderFigures(
            orders=len(self.totals),
            items=self.items,
            revenue=sum(self.totals.values()),
            paid=len(self.paid),
        )


async def run_in_memory(events: int, nodes: int) -> int:
    """The demo with ``nodes`` nodes in this process on an InMemoryBackend (the last one
    stops halfway when there are several); return the exit code."""
    backend = InMemoryBackend()
    try:
        return await _run_in_memory(backend, events, nodes)
    finally:
        await backend.close()


async def _run_in_memory(backend: InMemoryBackend, events: int, nodes: int) -> int:
    store = EventStore(backend)
    projection, reactor = OrderProjection(), ShippingReactor(store)
    settings = NodeSettings(poll_interval=timedelta(milliseconds=200), distributed=nodes > 1)
    members = [
        EventProcessingNode(backend, node_id=f"demo-node-{n + 1}", settings=settings)
        for n in range(nodes)
    ]
    orders = CategoryIdentifier("orders")
    for node in members:
        node.register_subscriber(
            group=GROUPS[0], source=orders, processor=projection, partitions=PARTITIONS
        )
        node.register_subscriber(
            group=GROUPS[1], source=orders, processor=reactor, partitions=PARTITIONS
        )
    print(f"eventmill demo on the in-memory backend: {events} events, {nodes} node(s)")
    plan, figures = plan_orders(events)
    publisher = Publisher(store, plan)
    started = time.perf_counter()
    rates = {group: _Rate() for group in GROUPS}
    stopped_one = False
    async with _running(members):
        publishing = asyncio.create_task(publisher.run(1))
        while True:
            await asyncio.sleep(0.25)
            done = publishing.done()
            published = publisher.published
            processed = {GROUPS[0]: projection.processed, GROUPS[1]: reactor.processed}
            line = progress_line(started, published, processed, rates)
            if nodes > 1 and published >= events // 2 and not stopped_one:
                stopped_one = True
                members[-1].stop()  # its sources move to the other nodes
                print(f"stopping {members[-1].node_id}: its sources move to the others")
            if nodes > 1:
                held = [
                    sum(len(h.subscriber.sources) for h in node.subscribers) for node in members
                ]
                line.append("sources per node " + "/".join(map(str, held)))
            print(" | ".join(line), flush=True)
            if done:
                publishing.result()
                if projection.processed == reactor.processed == published:
                    break
    elapsed = time.perf_counter() - started
    return check_summary(figures, projection.figures(), await count_shipments(store), elapsed)


class _running:
    """Run several nodes; ``async with`` returns once all are ready."""

    def __init__(self, nodes: list[EventProcessingNode]) -> None:
        self.nodes = nodes

    async def __aenter__(self) -> None:
        for node in self.nodes:
            await node.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> None:
        for node in self.nodes:
            node.stop()
        for node in reversed(self.nodes):
            await node.__aexit__(*exc_info)


# --- the node of the demo's processes -----------------------------------------------


class OrderSummaries(Projector):
    """One state per order: total, items, paid, and how many events were folded in."""

    name = "demo-orders"

    @handles("order-placed")
    def placed(self, state: JsonObject, event: StoredEvent) -> JsonObject:
        return {"total": 0, "items": 0, "paid": False, "events": 1}

    @handles("item-added")
    def item_added(self, state: JsonObject, event: StoredEvent) -> JsonObject:
        total, items, folded, price = (
            state["total"],
            state["items"],
            state["events"],
            event.payload["price"],
        )
        assert isinstance(total, int) and isinstance(items, int) and isinstance(folded, int)
        assert isinstance(price, int)
        return {**state, "total": total + price, "items": items + 1, "events": folded + 1}

    @handles("order-paid")
    def paid(self, state: JsonObject, event: StoredEvent) -> JsonObject:
        folded = state["events"]
        assert isinstance(folded, int)
        return {**state, "paid": True, "events": folded + 1}


NODE_SETTINGS = NodeSettings(
    poll_interval=timedelta(milliseconds=200),
    shutdown_timeout=timedelta(seconds=5),
    broker_settings=DistributedEventBrokerSettings(
        subscriber_manager_heartbeat_interval=timedelta(milliseconds=300),
        subscriber_manager_purge_interval=timedelta(seconds=1),
        subscriber_manager_subscriber_max_age=timedelta(seconds=2),
        coordinator_distribution_interval=timedelta(milliseconds=200),
        observer_synchronisation_interval=timedelta(milliseconds=200),
    ),
)
"""Short broker intervals, so sources move within about a second."""


def make_node(backend: Backend, *, mode: NodeMode, node_id: str | None) -> EventProcessingNode:
    """The demo's node: the projection and the reactor over the 8 partitions of
    ``orders`` (for ``eventmill run eventmill.demo:make_node``). Does no I/O."""
    node = EventProcessingNode(backend, mode=mode, node_id=node_id, settings=NODE_SETTINGS)
    if mode is not NodeMode.COORDINATOR:
        orders = CategoryIdentifier("orders")
        node.register_subscriber(
            group=GROUPS[0],
            source=orders,
            partitions=PARTITIONS,
            processor=ProjectionProcessor(
                OrderSummaries(), ProjectionStore(backend, OrderSummaries.name)
            ),
        )
        node.register_subscriber(
            group=GROUPS[1],
            source=orders,
            partitions=PARTITIONS,
            processor=ShippingReactor(EventStore(backend)),
        )
    return node


# --- on PostgreSQL: node processes --------------------------------------------------


@dataclass
class _Worker:
    node_id: str
    process: asyncio.subprocess.Process
    stopping: bool = False
    stderr: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def collect_stderr(self) -> None:
        """Keep the process's stderr lines until it closes it."""
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.stderr.append(line.decode(errors="replace").rstrip())

    async def failure(self) -> str | None:
        """Why the process failed (exit code and last stderr line), or None. Blocks
        until its stderr is read to the end when it has exited."""
        code = self.process.returncode
        if code is None or (code == 0 and self.stopping):
            return None
        if self.reader is not None:
            await self.reader
        lines = [line for line in self.stderr if line.strip()]
        last = lines[-1] if lines else "no message"
        return f"{self.node_id} exited with code {code}: {last}"


class NodeProcesses:
    """The demo's ``eventmill run`` processes, by node id, in start order."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self.workers: dict[str, _Worker] = {}

    async def start(self, node_id: str) -> None:
        """Start a node process (returns once it is spawned, not when it is ready)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "eventmill",
            "run",
            FACTORY,
            "--log-level",
            "warning",
            "--dsn",
            self.dsn,
            "--schema",
            self.schema,
            "--node-id",
            node_id,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        worker = self.workers[node_id] = _Worker(node_id, process)
        worker.reader = asyncio.create_task(worker.collect_stderr())

    def stop(self, node_id: str) -> None:
        """Ask a node process to stop gracefully (SIGTERM); does not wait."""
        worker = self.workers[node_id]
        worker.stopping = True
        if worker.process.returncode is None:
            worker.process.send_signal(signal.SIGTERM)

    def running(self, node_id: str) -> bool:
        return self.workers[node_id].process.returncode is None

    async def failure(self) -> str | None:
        """The first process that failed or exited unasked, or None."""
        for worker in self.workers.values():
            failure = await worker.failure()
            if failure is not None:
                return failure
        return None

    async def stop_all(self, grace: float = 20.0) -> None:
        """SIGTERM every process and wait; SIGKILL those still running after ``grace`` s."""
        for node_id in self.workers:
            self.stop(node_id)
        for worker in self.workers.values():
            try:
                async with asyncio.timeout(grace):
                    await worker.process.wait()
            except TimeoutError:
                worker.process.kill()
                await worker.process.wait()
            if worker.reader is not None:
                await worker.reader


PROCESSED = """
SELECT c.group_name, count(e.sequence_number)
FROM {schema}.checkpoints AS c
JOIN {schema}.events AS e
  ON e.category = c.source ->> 'category'
 AND e.stream_hash % (c.source ->> 'partitions')::bigint = (c.source ->> 'partition')::bigint
 AND e.sequence_number <= c.after_place
WHERE c.source ->> 'type' = 'category-partition'
GROUP BY c.group_name
"""

PROJECTED = """
SELECT count(*),
       coalesce(sum((state ->> 'items')::bigint), 0),
       coalesce(sum((state ->> 'total')::bigint), 0),
       count(*) FILTER (WHERE (state ->> 'paid')::boolean),
       coalesce(sum((state ->> 'events')::bigint), 0)
FROM {schema}.projections WHERE name = %s
"""


class ClusterView:
    """What the database says about the demo's nodes: events processed per group (up to
    each checkpoint), who holds which source, and the projection's figures."""

    def __init__(self, backend: PostgresBackend) -> None:
        self.backend = backend
        self.holders: dict[tuple[str, str], str] = {}
        """Last known holder node of each (group, source), kept while it is released."""

    async def processed(self) -> dict[str, int]:
        """Events before each group's checkpoints, summed over its sources."""
        async with self.backend.connection() as connection:
            cursor = await connection.execute(self.backend.sql(PROCESSED))
            return {str(group): int(count) for group, count in await cursor.fetchall()}

    async def holdings(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        """Sources held per node, and the moves since the last call (from, to)."""
        held: dict[str, int] = {}
        moves = []
        for holding in await self.backend.subscriptions.list():
            if holding.state is HoldingState.RELEASED or holding.node_id is None:
                continue
            held[holding.node_id] = held.get(holding.node_id, 0) + 1
            key = (holding.group, str(holding.source))
            before = self.holders.get(key)
            if before is not None and before != holding.node_id:
                moves.append((before, holding.node_id))
            self.holders[key] = holding.node_id
        return held, moves

    async def projected(self) -> tuple[OrderFigures, int]:
        """The projection's figures and the number of events folded into it."""
        async with self.backend.connection() as connection:
            cursor = await connection.execute(self.backend.sql(PROJECTED), (OrderSummaries.name,))
            row = await cursor.fetchone()
        assert row is not None
        orders, items, revenue, paid, folded = map(int, row)
        return OrderFigures(orders=orders, items=items, revenue=revenue, paid=paid), folded


def describe_moves(moves: list[tuple[str, str]]) -> str:
    """``a -> b x3, a -> c x2``: how many sources went from which node to which."""
    counted: dict[tuple[str, str], int] = {}
    for move in moves:
        counted[move] = counted.get(move, 0) + 1
    return ", ".join(f"{a} -> {b} x{n}" for (a, b), n in sorted(counted.items()))


async def run_on_postgres(
    backend: PostgresBackend, dsn: str, schema: str, events: int, nodes: int
) -> int:
    """The demo with ``nodes`` node processes on ``backend`` (PostgreSQL, schema
    installed); return the exit code. Every process is stopped before it returns."""
    processes = NodeProcesses(dsn, schema)
    try:
        return await _run_on_postgres(backend, processes, schema, events, nodes)
    finally:
        await processes.stop_all()


def _node_id(number: int) -> str:
    return f"demo-node-{number}"


async def _run_on_postgres(
    backend: PostgresBackend, processes: NodeProcesses, schema: str, events: int, nodes: int
) -> int:
    store = EventStore(backend)
    view = ClusterView(backend)
    print(
        f"eventmill demo on PostgreSQL (schema {schema}): {events} events, "
        f"{nodes} node process(es) running `eventmill run {FACTORY}`"
    )
    for number in range(1, nodes + 1):
        await processes.start(_node_id(number))
    sources = len(GROUPS) * PARTITIONS
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        failure = await processes.failure()
        if failure is not None:
            print(f"FAILED: {failure}")
            return EXIT_FAILED
        held, _ = await view.holdings()
        if len(held) == min(nodes, sources) and sum(held.values()) == sources:
            break
        if time.monotonic() > deadline:
            print(f"FAILED: the nodes did not take their sources within {START_TIMEOUT:.0f}s")
            return EXIT_FAILED
        await asyncio.sleep(0.1)
    print(f"{nodes} node(s) hold the {sources} sources: {_held_text(held, processes)}")

    plan, figures = plan_orders(events)
    publisher = Publisher(store, plan)
    leaving, joining = _node_id(nodes), _node_id(nodes + 1)
    phase = "before stop"
    started = time.perf_counter()
    rates = {group: _Rate() for group in GROUPS}
    publishing = asyncio.create_task(publisher.run(PUBLISHERS))
    last_state: object = None
    last_change = time.monotonic()
    try:
        while True:
            await asyncio.sleep(TICK)
            failure = await processes.failure()
            if failure is not None:
                print(f"FAILED: {failure}")
                return EXIT_FAILED
            if publishing.done():
                publishing.result()
            published = publisher.published
            processed = await view.processed()
            held, moves = await view.holdings()
            line = progress_line(started, published, processed, rates)
            line.append("sources held: " + _held_text(held, processes))
            print(" | ".join(line), flush=True)
            if moves:
                print(f"  sources moved: {describe_moves(moves)}", flush=True)
            if phase == "before stop" and published >= events // 3:
                print(f"  stopping {leaving} gracefully (SIGTERM): its sources move")
                processes.stop(leaving)
                phase = "stopping"
            elif phase == "stopping" and not processes.running(leaving) and leaving not in held:
                print(f"  {leaving} has stopped; starting {joining}: sources move to it")
                await processes.start(joining)
                phase = "joining"
            elif phase == "joining" and held.get(joining, 0) > 0:
                phase = "joined"
            state = (published, sorted(processed.items()), sorted(held.items()), phase)
            if state != last_state:
                last_state, last_change = state, time.monotonic()
            elif time.monotonic() - last_change > STALL_TIMEOUT:
                print(f"FAILED: nothing changed for {STALL_TIMEOUT:.0f}s ({phase})")
                return EXIT_FAILED
            if (
                phase == "joined"
                and publishing.done()
                and all(processed.get(group) == figures.events for group in GROUPS)
            ):
                break
    finally:
        if not publishing.done():
            publishing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publishing
    elapsed = time.perf_counter() - started
    print("caught up; stopping the node processes")
    await processes.stop_all()
    failure = await processes.failure()
    if failure is not None:
        print(f"FAILED: {failure}")
        return EXIT_FAILED
    found, folded = await view.projected()
    if folded != figures.events:
        print(
            f"FAILED: the projection folded in {folded} events, "
            f"not exactly the {figures.events} published"
        )
        return EXIT_FAILED
    print(f"  projection folded in each of the {folded} events exactly once")
    return check_summary(figures, found, await count_shipments(store), elapsed)


def _held_text(held: dict[str, int], processes: NodeProcesses) -> str:
    return ", ".join(
        f"{node_id} {held.get(node_id, 0)}" + ("" if processes.running(node_id) else " (stopped)")
        for node_id in processes.workers
    )

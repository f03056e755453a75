"""eventmill beside its Python peers, the same workloads interleaved in rounds.

The peer is ``eventsourcing`` 9.5.x (its PostgreSQL application recorder and its POPO
in-memory recorder), installed by this module into its own environment, ``.venv-peers/``
(ignored by git), on first use. ``logicblocks-event-store`` is tried too and left out,
with a line saying so, when it cannot be installed.

Each round runs every workload once per library, each library in a fresh process of its
own interpreter doing ``REPEATS`` runs; a library's figure for the round is the median of
its runs. The JSON lines give, per workload, every round's ratio (eventmill / peer for
rates; peer / eventmill for latencies, so above 1 is better for eventmill either way)
and their median. Workloads (see ``benchmarks/peer_eventsourcing.py`` for the peer side):

- ``memory.publish.single`` / ``memory.publish.batch_100``: publishes of one event (100
  streams in turn) and of batches of 100, in memory, timed in CPU seconds of the
  process (``time.process_time``): on a shared machine, wall time of pure Python work
  mostly measures the other processes;
- ``postgres.publish.single`` / ``.batch_100`` / ``.single.8_writers``: the same on
  PostgreSQL, one writer, and 8 concurrent writers of single events;
- ``postgres.read.page_500`` / ``page_100``: a 100,000-event category read in order,
  payloads decoded to dicts;
- ``postgres.latency.sparse`` / ``.dense``: publish-to-consumer time, one event at a
  time, 10-250 ms apart or 0-10 ms apart, p50 and p99 (eventmill: a push subscriber,
  the peer: a ``subscribe()`` iterator), each side after one delivery not counted
  that warms up its connections (with 40 samples the p99 is the slowest one).

``python -m benchmarks.peers`` (part of ``make bench``). Uses ``EVENTMILL_TEST_DSN`` and
throwaway schemas, dropped at the end. ``PEERS_ROUNDS`` sets the rounds (default 5);
``PEERS_ONLY=memory.`` runs only the workloads whose names start so. ``PEERS_GC=off``
runs the in-memory workloads of both sides with Python's cyclic garbage collector off
(``gc.disable()``), to show how much of each side's time its collections take.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from psycopg import sql

from benchmarks.common import report
from benchmarks.consumers import latency, percentile
from eventmill.backends.memory import InMemoryBackend
from eventmill.backends.postgres import PostgresBackend
from eventmill.events import NewEvent
from eventmill.store import EventStore

ROOT = Path(__file__).resolve().parent.parent
PEERS_VENV = ROOT / ".venv-peers"
PEER_PACKAGES = ["eventsourcing[postgres]==9.5.6", "psycopg[binary]>=3.2"]
OPTIONAL_PEERS = ["logicblocks-event-store==0.1.12a6"]
ROUNDS = int(os.environ.get("PEERS_ROUNDS", "5"))
ONLY = os.environ.get("PEERS_ONLY", "")
GC_OFF = os.environ.get("PEERS_GC") == "off"
REPEATS = 3
DSN = os.environ.get("EVENTMILL_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")
SIZES = {
    "memory_single": 20_000,
    "memory_batch": 20_000,
    "pg_single": 300,
    "pg_batch": 3_000,
    "pg_writer": 40,
    "pg_read": 100_000,
    "latency_samples": 40,
}
WORKLOADS = [
    "memory.publish.single",
    "memory.publish.batch_100",
    "postgres.publish.single",
    "postgres.publish.single.8_writers",
    "postgres.publish.batch_100",
    "postgres.read.page_500",
    "postgres.read.page_100",
    "postgres.latency.sparse",
    "postgres.latency.dense",
]


def new_events(numbers: range) -> list[NewEvent]:
    return [NewEvent(name="happened", payload={"n": n, "note": "benchmark event"}) for n in numbers]


async def publish_rate(
    backend: InMemoryBackend | PostgresBackend, events: int, batch: int
) -> float:
    """Events/s; in memory per second of this process's CPU time (see the docstring)."""
    clock = time.process_time if isinstance(backend, InMemoryBackend) else time.perf_counter
    store = EventStore(backend)
    streams = [
        store.stream(category="writes", stream=f"s{secrets.token_hex(4)}") for _ in range(100)
    ]
    started = clock()
    for turn, start in enumerate(range(0, events, batch)):
        await streams[turn % len(streams)].publish(new_events(range(start, start + batch)))
    return events / (clock() - started)


async def writers_rate(backend: PostgresBackend, writers: int, each: int) -> float:
    store = EventStore(backend)

    async def write() -> None:
        streams = [store.stream(category="writes", stream=secrets.token_hex(4)) for _ in range(10)]
        for number in range(each):
            await streams[number % 10].publish(new_events(range(number, number + 1)))

    started = time.perf_counter()
    await asyncio.gather(*(write() for _ in range(writers)))
    return writers * each / (time.perf_counter() - started)


async def read_rate(backend: PostgresBackend, page: int) -> float:
    count = 0
    started = time.perf_counter()
    async for event in EventStore(backend).category("reads").iterate(page_size=page):
        assert event.payload["note"] == "benchmark event"
        count += 1
    return count / (time.perf_counter() - started)


async def run_eventmill(workload: str, repeats: int, schema: str) -> list[float]:
    """The eventmill side of one workload: ``repeats`` figures."""
    if workload.startswith("memory."):
        if GC_OFF:
            gc.disable()
        batch = 1 if workload.endswith("single") else 100
        size = SIZES["memory_single" if batch == 1 else "memory_batch"]
        return [await publish_rate(InMemoryBackend(), size, batch) for _ in range(repeats)]
    # The peer opens its whole pool up front (eventsourcing's pool_size is its min_size):
    # the 8-writer workload starts with 8 connections open on both sides, the latency
    # workloads with 2 for work (the peer's third holds its LISTEN; eventmill listens on
    # a connection of its own). Otherwise a checkpoint save overlapping a publish made
    # eventmill's pool open a connection in the middle of the samples.
    opened = 8 if workload.endswith("8_writers") else 2 if ".latency." in workload else 1
    backend = await PostgresBackend.connect(DSN, schema=schema, min_size=opened, max_size=8)
    try:
        await backend.install_schema()
        if workload == "postgres.publish.single":
            return [await publish_rate(backend, SIZES["pg_single"], 1) for _ in range(repeats)]
        if workload == "postgres.publish.batch_100":
            return [await publish_rate(backend, SIZES["pg_batch"], 100) for _ in range(repeats)]
        if workload == "postgres.publish.single.8_writers":
            return [await writers_rate(backend, 8, SIZES["pg_writer"]) for _ in range(repeats)]
        if workload.startswith("postgres.read.page_"):
            present = await EventStore(backend).category("reads").latest()
            if present is None:
                stream = EventStore(backend).stream(category="reads", stream="filled")
                for start in range(0, SIZES["pg_read"], 1_000):
                    await stream.publish(new_events(range(start, start + 1_000)))
            page = int(workload.rsplit("_", 1)[1])
            return [await read_rate(backend, page) for _ in range(repeats)]
        if workload.startswith("postgres.latency."):
            gaps = (0.01, 0.25) if workload.endswith("sparse") else (0.0, 0.01)
            return await latency(backend, push=True, samples=SIZES["latency_samples"], gaps=gaps)
        raise SystemExit(f"unknown workload {workload}")
    finally:
        await backend.close()


def ensure_peers() -> Path:
    """The peers' interpreter, installing them into ``.venv-peers`` when missing."""
    python = PEERS_VENV / "bin" / "python"
    probe = [str(python), "-c", "import eventsourcing.postgres"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, *PEER_PACKAGES], check=True)
    for package in OPTIONAL_PEERS:
        if subprocess.run([*pip, package], capture_output=True).returncode != 0:
            print(f"peers: {package} could not be installed here; left out", file=sys.stderr)
    return python


def run_side(command: list[str]) -> list[float] | None:
    """The figures one side printed, or None (and a line on stderr) when it failed."""
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(
            f"peers: {command[-4]} on {Path(command[0]).parts[-3]} failed: {last}", file=sys.stderr
        )
        return None
    values: list[float] = json.loads(done.stdout.strip().splitlines()[-1])["values"]
    return values


def summarise(workload: str, values: list[float]) -> dict[str, float]:
    if ".latency." in workload:
        return {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99)}
    return {"rate": statistics.median(values)}


async def drop_schemas(schemas: list[str]) -> None:
    async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as connection:
        for schema in schemas:
            await connection.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
            )


async def main() -> None:
    peer_python = ensure_peers()
    token = secrets.token_hex(4)
    ours, theirs = f"em_peers_{token}", f"es_peers_{token}"
    ratios: dict[str, list[float]] = {}
    async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as connection:
        await connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(theirs)))
    try:
        for round_number in range(1, ROUNDS + 1):
            for workload in [w for w in WORKLOADS if w.startswith(ONLY)]:
                peer_script = str(ROOT / "benchmarks" / "peer_eventsourcing.py")
                ours_values = run_side(
                    [sys.executable, "-m", "benchmarks.peers", workload, str(REPEATS), ours, "-"]
                )
                peer_values = run_side(
                    [
                        str(peer_python),
                        peer_script,
                        workload,
                        str(REPEATS),
                        theirs,
                        json.dumps(SIZES),
                    ]
                )
                if ours_values is None or peer_values is None:
                    continue
                mine, peer = summarise(workload, ours_values), summarise(workload, peer_values)
                for figure in mine:
                    key = f"{workload}.{figure}" if figure != "rate" else workload
                    if figure == "rate":
                        ratio = mine[figure] / peer[figure]
                    else:
                        ratio = peer[figure] / mine[figure]
                    ratios.setdefault(key, []).append(ratio)
                    report(
                        f"peers.{key}.round",
                        ratio,
                        "ratio to eventsourcing (>1: eventmill better)",
                        round=round_number,
                        eventmill=round(mine[figure], 3),
                        eventsourcing=round(peer[figure], 3),
                    )
        for key, values in ratios.items():
            report(
                f"peers.{key}",
                statistics.median(values),
                "ratio to eventsourcing (>1: eventmill better), median of rounds",
                rounds=[round(value, 3) for value in values],
            )
    finally:
        await drop_schemas([ours, theirs])


if __name__ == "__main__":
    figures = asyncio.run(run_eventmill(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
    print(json.dumps({"values": figures}))

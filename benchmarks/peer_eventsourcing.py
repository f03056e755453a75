"""The peer side of ``benchmarks.peers``: the same workloads on ``eventsourcing``'s
recorders (PostgreSQL and POPO), run by the interpreter of ``.venv-peers``.

``python benchmarks/peer_eventsourcing.py WORKLOAD REPEATS SCHEMA`` prints one JSON line,
``{"values": [...]}`` (events/s, or latencies in ms for the latency workloads).

What each workload does on this side, so the work matches eventmill's: publishing
(in memory timed in CPU seconds of the process, as on eventmill's side) encodes the
payload dict to JSON bytes (``state``) and records it with a fresh UUID
originator per stream and the next version; reading pages through the notifications in
order (``select_notifications``, the application sequence: the table holds one kind of
event, so it is the category) and decodes each ``state`` back to a dict. Latency is a
``subscribe()`` iterator (its LISTEN thread) seeing a published event.

This file imports nothing from eventmill: it runs where only eventsourcing is installed.
"""

from __future__ import annotations

import gc
import json
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from eventsourcing.persistence import StoredEvent
from eventsourcing.popo import POPOApplicationRecorder
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore

TOPIC = "bench:happened"
STREAMS = 100


def payload(number: int) -> bytes:
    return json.dumps({"n": number, "note": "benchmark event"}).encode()


def datastore(schema: str, pool_size: int = 1) -> PostgresDatastore:
    url = urlparse(os.environ.get("EVENTMILL_TEST_DSN", "postgresql://postgres@127.0.0.1/test"))
    return PostgresDatastore(
        dbname=url.path.lstrip("/"),
        host=url.hostname or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password or "",
        pool_size=pool_size,
        schema=schema,
    )


def recorder(schema: str, table: str, pool_size: int = 1) -> PostgresApplicationRecorder:
    made = PostgresApplicationRecorder(datastore(schema, pool_size), events_table_name=table)
    made.create_table()
    return made


class Streams:
    """Originator ids and their next versions, ``count`` streams used in turn."""

    def __init__(self, count: int = STREAMS) -> None:
        self.ids = [uuid.uuid4() for _ in range(count)]
        self.versions = [0] * count
        self.turn = 0

    def events(self, numbers: range) -> list[StoredEvent]:
        slot = self.turn % len(self.ids)
        self.turn += 1
        first = self.versions[slot]
        self.versions[slot] += len(numbers)
        return [
            StoredEvent(
                originator_id=self.ids[slot],
                originator_version=first + offset,
                topic=TOPIC,
                state=payload(number),
            )
            for offset, number in enumerate(numbers)
        ]


def publish_rate(
    insert: Any, events: int, batch: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    streams = Streams()
    started = clock()
    for start in range(0, events, batch):
        insert(streams.events(range(start, start + batch)))
    return events / (clock() - started)


def writers_rate(made: PostgresApplicationRecorder, writers: int, each: int) -> float:
    def write() -> None:
        streams = Streams(10)
        for number in range(each):
            made.insert_events(streams.events(range(number, number + 1)))

    threads = [threading.Thread(target=write) for _ in range(writers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return writers * each / (time.perf_counter() - started)


def read_rate(made: PostgresApplicationRecorder, page: int) -> float:
    count = 0
    after = 0
    started = time.perf_counter()
    while True:
        notifications = made.select_notifications(after, page, inclusive_of_start=False)
        for notification in notifications:
            json.loads(notification.state)
        count += len(notifications)
        if len(notifications) < page:
            break
        after = notifications[-1].id
    return count / (time.perf_counter() - started)


def latencies(
    made: PostgresApplicationRecorder, samples: int, gaps: tuple[float, float]
) -> list[float]:
    seen: list[float] = []
    done = threading.Event()
    subscription = made.subscribe(gt=made.max_notification_id())

    def consume() -> None:
        with subscription:
            for notification in subscription:
                sent = json.loads(notification.state)["sent"]
                seen.append((time.perf_counter() - sent) * 1_000)
                if len(seen) == samples + 1:
                    done.set()
                    return

    consumer = threading.Thread(target=consume)
    consumer.start()
    chooser = random.Random(7)
    streams = Streams(1)
    for _ in range(samples + 1):  # the first, a warm-up, is not counted (as on eventmill's side)
        time.sleep(gaps[0] + chooser.random() * (gaps[1] - gaps[0]))
        count = len(seen)
        event = streams.events(range(1))[0]
        stamped = StoredEvent(
            originator_id=event.originator_id,
            originator_version=event.originator_version,
            topic=TOPIC,
            state=json.dumps({"sent": time.perf_counter()}).encode(),
        )
        made.insert_events([stamped])
        deadline = time.monotonic() + 10
        while len(seen) == count and time.monotonic() < deadline:
            time.sleep(0.0002)
    done.wait(10)
    subscription.stop()
    consumer.join(10)
    return seen[1:]


def run(workload: str, repeats: int, schema: str, sizes: dict[str, int]) -> list[float]:
    if workload.startswith("memory.") and os.environ.get("PEERS_GC") == "off":
        gc.disable()  # as on eventmill's side (benchmarks.peers)
    if workload == "memory.publish.single":
        return [
            publish_rate(
                POPOApplicationRecorder().insert_events,
                sizes["memory_single"],
                1,
                time.process_time,
            )
            for _ in range(repeats)
        ]
    if workload == "memory.publish.batch_100":
        return [
            publish_rate(
                POPOApplicationRecorder().insert_events,
                sizes["memory_batch"],
                100,
                time.process_time,
            )
            for _ in range(repeats)
        ]
    if workload == "postgres.publish.single":
        made = recorder(schema, "writes")
        return [publish_rate(made.insert_events, sizes["pg_single"], 1) for _ in range(repeats)]
    if workload == "postgres.publish.batch_100":
        made = recorder(schema, "writes")
        return [publish_rate(made.insert_events, sizes["pg_batch"], 100) for _ in range(repeats)]
    if workload == "postgres.publish.single.8_writers":
        made = recorder(schema, "writes", pool_size=8)
        return [writers_rate(made, 8, sizes["pg_writer"]) for _ in range(repeats)]
    if workload.startswith("postgres.read.page_"):
        made = recorder(schema, "reads")
        present = made.max_notification_id() or 0
        if present < sizes["pg_read"]:
            publish_rate(made.insert_events, sizes["pg_read"] - present, 1_000)
        page = int(workload.rsplit("_", 1)[1])
        return [read_rate(made, page) for _ in range(repeats)]
    if workload.startswith("postgres.latency."):
        made = recorder(schema, "latency", pool_size=3)  # LISTEN holds one connection
        gaps = (0.01, 0.25) if workload.endswith("sparse") else (0.0, 0.01)
        return latencies(made, sizes["latency_samples"], gaps)
    raise SystemExit(f"unknown workload {workload}")


if __name__ == "__main__":
    name, count, schema_name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    print(json.dumps({"values": run(name, count, schema_name, json.loads(sys.argv[4]))}))

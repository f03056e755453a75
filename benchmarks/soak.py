"""Soak run (``make soak``): 3 node processes on PostgreSQL under steady publishing
with faults (kills, zombies, terminated connections, server restarts) for a while;
then every guarantee is checked. ``python -m benchmarks.soak [MINUTES]`` (default
``EVENTMILL_SOAK_MINUTES`` or 10); ``EVENTMILL_SOAK_SEED`` fixes the schedule.

Prints JSON lines: progress every 30 s (events published, processed per group, lag,
node memory), then throughput, final lag, memory of each node process at start and
end, faults injected, duplicates versus the bound, and the violations found (none
expected). It runs on a PostgreSQL cluster of its own (tests/servers.py), made for the
run and removed afterwards: the machine's shared server is never restarted.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import sys
import time
from datetime import timedelta

from tests.harness.faults import FaultCluster, FaultGroup, FaultSchedule, Publisher
from tests.servers import PrivateCluster

from benchmarks.common import report

GROUPS = [
    FaultGroup(group="exact-partitions", category="ticks", partitions=4),
    FaultGroup(group="exact-whole", category="ticks"),
    FaultGroup(group="at-least-once", category="ticks", partitions=2, transactional=False),
]
NODES = ("n1", "n2", "n3")
RATE = 50.0
"""Events published per second."""
PROGRESS_EVERY = 30.0


async def processed(cluster: FaultCluster) -> dict[str, int]:
    """Distinct events processed per group."""
    return {group.group: len(await cluster.processed_counts(group.group)) for group in GROUPS}


async def progress(cluster: FaultCluster, publisher: Publisher, began: float) -> None:
    """A progress line every PROGRESS_EVERY seconds."""
    while True:
        await asyncio.sleep(PROGRESS_EVERY)
        try:
            done = await processed(cluster)
            committed = len(await cluster.committed("ticks"))
        except Exception as error:  # the server may be restarting: skip this line
            print(json.dumps({"name": "soak-progress", "error": repr(error)}), flush=True)
            continue
        print(
            json.dumps(
                {
                    "name": "soak-progress",
                    "seconds": round(time.monotonic() - began),
                    "published": publisher.published,
                    "committed": committed,
                    "lag": {group: committed - count for group, count in done.items()},
                    "faults": dict(cluster.injected),
                    "rss_kb": {n: r["rss_kb"][1] for n, r in cluster.resources().items()},
                }
            ),
            flush=True,
        )


async def main(minutes: float | None = None) -> None:
    if minutes is None:
        minutes = float(os.environ.get("EVENTMILL_SOAK_MINUTES", 10))
    seed = int(os.environ.get("EVENTMILL_SOAK_SEED", random.randrange(2**32)))
    duration = timedelta(minutes=minutes)
    schedule = FaultSchedule.generate(
        seed,
        duration=duration,
        nodes=NODES,
        mean_gap=timedelta(seconds=8),
        restarts=max(1, int(minutes // 5)),
    )
    print(
        json.dumps(
            {"name": "soak-start", "seed": seed, "minutes": minutes, "schedule": schedule.counts()}
        ),
        flush=True,
    )
    server = await asyncio.to_thread(PrivateCluster.create, {"max_connections": "100"})
    try:
        async with FaultCluster(
            server.dsn(), f"em_soak_{secrets.token_hex(4)}", server=server, groups=GROUPS
        ) as cluster:
            await asyncio.gather(*(cluster.start(node_id) for node_id in NODES))
            publisher = Publisher(cluster.store, "ticks", rate=RATE, seed=seed)
            began = time.monotonic()
            tasks = [
                asyncio.get_running_loop().create_task(publisher.run()),
                asyncio.get_running_loop().create_task(progress(cluster, publisher, began)),
            ]
            try:
                await cluster.inject(schedule)
                await asyncio.sleep(max(0.0, began + duration.total_seconds() - time.monotonic()))
            finally:
                for task in tasks:
                    task.cancel()
            elapsed = time.monotonic() - began
            await cluster.wait_quiescent(timeout=timedelta(minutes=5))
            drained = time.monotonic() - began - elapsed
            result = await cluster.check()
            resources = cluster.resources()
            total = await processed(cluster)
    finally:
        await asyncio.to_thread(server.remove)
    report(
        "soak-published",
        publisher.published / elapsed,
        "events/s",
        published=publisher.published,
        failed_publishes=publisher.failed,
        seconds=round(elapsed),
    )
    for group, count in total.items():
        report(f"soak-processed-{group}", count / elapsed, "events/s", events=count)
    report("soak-drain-after-faults", drained, "s")
    for node_id, figures in resources.items():
        start, end = figures["rss_kb"]
        report(
            f"soak-rss-growth-{node_id}",
            (end - start) / 1024,
            "MiB",
            start_kb=start,
            end_kb=end,
            process_seconds=figures["seconds"],
            threads=figures["threads"],
            tasks=figures["tasks"],
        )
    report(
        "soak-faults",
        sum(cluster.injected.values()),
        "faults",
        **dict(cluster.injected),
        connections_terminated=cluster.terminated,
    )
    for group, extra in result.duplicates.items():
        report(f"soak-duplicates-{group}", extra, "events", bound=result.duplicate_bound[group])
    report(
        "soak-violations",
        len(result.violations),
        "violations",
        violations=result.violations[:20],
        connections=result.connections,
        seed=seed,
    )


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]) if len(sys.argv) > 1 else None))

"""Run every benchmark (``make bench``): ``python -m benchmarks [NAME ...]``."""

from __future__ import annotations

import asyncio
import importlib
import sys

MODULES = [
    "store_memory",
    "store_postgres",
    "blocking_publish",
    "allocation",
    "consumers",
    "latency_chain",
    "parking",
    "partitions",
    "coordinator",
    "failover",
    "rebuilds",
    "shared_tail",
    "peers",
    "profiles",
    "watermark_locks",
    "console",
    "operations",
]


def main(names: list[str]) -> None:
    for name in names or MODULES:
        module = importlib.import_module(f"benchmarks.{name}")
        asyncio.run(module.main())


if __name__ == "__main__":
    main(sys.argv[1:])

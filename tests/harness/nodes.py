"""NodeSet: broker node processes on PostgreSQL for multi-node tests.

::

    async with NodeSet(backend, groups=[GroupConfig(group="g", category="c", partitions=4)],
                       settings=fast_settings) as nodes:
        first = await nodes.start()
        second = await nodes.start()
        await nodes.stop(first)       # graceful: SIGTERM, exit code 0 expected
        await nodes.kill(second)      # SIGKILL
        frozen = await nodes.start()
        nodes.freeze(frozen)          # SIGSTOP ... nodes.thaw(frozen): SIGCONT

Each node is a ``python -m tests.harness.node_process`` process (see there for
what it records: the ``processed`` and ``node_log`` tables of the backend's schema).
Leaving the block kills the nodes still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from eventmill.backends.postgres import PostgresBackend
from eventmill.broker.distributed import DistributedEventBrokerSettings
from eventmill.errors import LifecycleError
from tests.harness.node_process import TABLES, GroupConfig

ROOT = Path(__file__).resolve().parents[2]
"""The repository, the working directory of node processes (``-m tests...``)."""


@dataclass(slots=True)
class Node:
    """A node process started by a NodeSet."""

    node_id: str
    process: asyncio.subprocess.Process = field(repr=False)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid


_DUMP_GRACE = 1.0
"""Seconds a node that did not stop is given to print its task stacks."""


class NodeSet:
    """Starts, stops, kills, freezes and replaces node processes sharing ``backend``'s
    schema (its tables are created on ``__aenter__``)."""

    def __init__(
        self,
        backend: PostgresBackend,
        *,
        groups: Sequence[GroupConfig],
        settings: DistributedEventBrokerSettings,
        poll_interval: timedelta = timedelta(seconds=1),
        checkpoint_every: int = 10,
        pool_size: int = 3,
        ready_timeout: timedelta = timedelta(seconds=30),
        shutdown_timeout: timedelta = timedelta(seconds=10),
        stop_timeout: timedelta = timedelta(seconds=20),
    ) -> None:
        self.backend = backend
        self.groups = list(groups)
        self.settings = settings
        self._config: dict[str, Any] = {
            "schema": backend.schema,
            "groups": [asdict(group) for group in self.groups],
            "settings": {
                name: getattr(settings, name).total_seconds() for name in settings.__slots__
            },
            "poll_interval": poll_interval.total_seconds(),
            "checkpoint_every": checkpoint_every,
            "pool_size": pool_size,
            "shutdown_timeout": shutdown_timeout.total_seconds(),
        }
        self._ready_timeout = ready_timeout.total_seconds()
        self._stop_timeout = stop_timeout.total_seconds()
        self._numbers = itertools.count(1)
        self.nodes: list[Node] = []
        """The nodes started and not yet stopped or killed."""

    async def __aenter__(self) -> Self:
        async with self.backend.connection() as connection:
            await connection.execute(self.backend.sql(TABLES))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for node in list(self.nodes):
            await self.kill(node)

    async def start(self, node_id: str | None = None) -> Node:
        """Start a node and return once it is ready (its subscribers registered and one
        synchronisation done). Raises LifecycleError if it exits or is not ready in
        time."""
        node_id = node_id or f"node-{next(self._numbers)}"
        conninfo = self.backend.pool.conninfo
        config = {**self._config, "node_id": node_id, "dsn": conninfo}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.harness.node_process",
            json.dumps(config),
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        node = Node(node_id, process)
        self.nodes.append(node)
        assert process.stdout is not None
        try:
            async with asyncio.timeout(self._ready_timeout):
                line = await process.stdout.readline()
        except TimeoutError:
            await self.kill(node)
            raise LifecycleError(f"{node_id} was not ready in time") from None
        if line.strip() != b"ready":
            await self.kill(node)
            raise LifecycleError(f"{node_id} did not start: {line!r}")
        return node

    async def stop(self, node: Node) -> int:
        """Stop ``node`` gracefully (SIGTERM) and return its exit code. Raises
        LifecycleError (having made it print its task stacks to stderr and killed it)
        when it has not exited within ``stop_timeout``."""
        self._forget(node)
        with contextlib.suppress(ProcessLookupError):
            node.process.send_signal(signal.SIGCONT)
            node.process.terminate()
        try:
            async with asyncio.timeout(self._stop_timeout):
                return await node.process.wait()
        except TimeoutError:
            pass
        self.dump_tasks(node)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_DUMP_GRACE):
                await node.process.wait()
        await self.kill(node)
        raise LifecycleError(f"{node.node_id} did not stop in time")

    async def kill(self, node: Node) -> int:
        """Kill ``node`` (SIGKILL) and return its exit code."""
        self._forget(node)
        with contextlib.suppress(ProcessLookupError):
            node.process.kill()
        return await node.process.wait()

    def dump_tasks(self, node: Node) -> None:
        """Make ``node`` print its task stacks to stderr (SIGUSR1); never blocks."""
        with contextlib.suppress(ProcessLookupError):
            node.process.send_signal(signal.SIGUSR1)

    def freeze(self, node: Node) -> None:
        """Pause ``node`` (SIGSTOP)."""
        node.process.send_signal(signal.SIGSTOP)

    def thaw(self, node: Node) -> None:
        """Resume a frozen ``node`` (SIGCONT)."""
        node.process.send_signal(signal.SIGCONT)

    async def replace(self, node: Node) -> Node:
        """Start a new node, then stop ``node`` gracefully; return the new one."""
        new = await self.start()
        await self.stop(node)
        return new

    def _forget(self, node: Node) -> None:
        if node in self.nodes:
            self.nodes.remove(node)

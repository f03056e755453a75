"""ClusterRefresher: the one task per console server that reads the cluster, shared by
every open page (ten tabs cost the database what one does).

Each ``interval`` it reads the cluster (``read_cluster``), feeds the history and wakes
every waiting page with the new message. A failed read becomes a message with an
``error`` line, and the next read is tried an interval later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from eventmill.backends.base import Backend
from eventmill.console.cluster import ClusterState, ConsoleSettings, read_cluster
from eventmill.console.history import ClusterHistory
from eventmill.errors import EventmillError

logger = logging.getLogger(__name__)


class ClusterRefresher:
    """Reads the cluster every ``interval`` while running and hands each read to every
    page waiting in ``updates()``. ``reads`` counts the reads done."""

    def __init__(
        self,
        backend: Backend,
        settings: ConsoleSettings,
        *,
        interval: timedelta = timedelta(seconds=1),
        history: ClusterHistory | None = None,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.interval = interval.total_seconds()
        self.history = history or ClusterHistory()
        self.reads = 0
        self.state: dict[str, Any] | None = None
        """The latest message: the read as plain data, with the changes it found."""
        self._serial = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start reading on the running loop, unless already started (does not block)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop reading; waits for the task to end. A second close is a no-op."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def refresh(self) -> dict[str, Any]:
        """Read once now, record and publish the read; return its message."""
        previous: ClusterState | None = self.history.latest
        try:
            state = await read_cluster(self.backend, self.settings, previous)
        except EventmillError as error:
            message: dict[str, Any] = {
                "read_at": datetime.now(UTC).isoformat(),
                "error": str(error).strip().splitlines()[0] if str(error).strip() else repr(error),
            }
        else:
            changes = self.history.add(state)
            message = {**state.to_json(), "changes": changes}
        self.reads += 1
        async with self._changed:
            self.state = message
            self._serial += 1
            self._changed.notify_all()
        return message

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.refresh()
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))

    def history_message(self) -> dict[str, Any]:
        """What a page needs to draw what happened before it opened."""
        return {
            "lag": dict(self.history.samples()),
            "changes": list(self.history.changes),
        }

    async def updates(self) -> AsyncIterator[dict[str, Any]]:
        """The latest message at once (if any), then each new one as it is read; starts
        the reading task if needed. Ends only when cancelled (the page went away)."""
        self.start()
        seen = 0
        while True:
            async with self._changed:
                while self._serial <= seen:
                    await self._changed.wait()
                seen, message = self._serial, self.state
            assert message is not None
            yield message


def sse(event: str, data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"

"""The registry behind every ``EventNotifications``: who waits for which source, on
which event loop, and how to wake them without ever blocking or failing a publisher."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable

from eventmill.events import EventSourceIdentifier, LogIdentifier


class WakeupRegistry:
    """Watchers keyed by a token; thread-safe. ``wake(category)`` schedules each
    concerned watcher's callback on its own loop (``None`` wakes everyone)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens = itertools.count()
        self._watchers: dict[
            int, tuple[EventSourceIdentifier, Callable[[], None], asyncio.AbstractEventLoop]
        ] = {}

    def add(self, source: EventSourceIdentifier, wake: Callable[[], None]) -> Callable[[], None]:
        """Register ``wake`` for ``source`` on the running loop; return the remover."""
        loop = asyncio.get_running_loop()
        token = next(self._tokens)
        with self._lock:
            self._watchers[token] = (source, wake, loop)

        def remove() -> None:
            with self._lock:
                self._watchers.pop(token, None)

        return remove

    def __len__(self) -> int:
        with self._lock:
            return len(self._watchers)

    def wake(self, category: str | None) -> None:
        """Schedule the callbacks of the watchers that ``category`` may concern.

        A watcher on the loop running in this thread (a PostgreSQL listener and its
        subscribers on one loop, an in-memory publish and its subscribers) is scheduled
        with ``call_soon``: ``call_soon_threadsafe`` also writes to the loop's wake-up
        pipe, a system call and one more ready callback on every delivery."""
        if not self._watchers:  # every publish calls this; most stores have no watcher
            return
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        with self._lock:
            targets = [
                (token, wake, loop)
                for token, (source, wake, loop) in self._watchers.items()
                if category is None
                or isinstance(source, LogIdentifier)
                or source.category == category
            ]
        for token, wake, loop in targets:
            if loop is here:
                loop.call_soon(wake)
                continue
            try:
                loop.call_soon_threadsafe(wake)
            except RuntimeError:  # that loop is closed: its watcher is gone for good
                with self._lock:
                    self._watchers.pop(token, None)

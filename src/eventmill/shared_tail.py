"""SharedTail: one reader per node per source, shared by the consumers that follow it.

Subscribers of different groups on one node that follow the same log, category or
partition would each read it: 20 groups woken by one publish sent 20 reads. Instead,
their event sources (``EventSource(..., shared_tail=True)``, what subscribers use)
read through the one ``SharedTail`` of that source on their backend and event loop,
which keeps the newest events it has read (a window of at most ``WINDOW_EVENTS``):

- a read that starts inside the window is served from it as far as it reaches;
- to look beyond the window's end it fetches the next page, one fetch at a time: every
  reader that asks meanwhile waits for that fetch (or the next one) instead of sending
  its own, so readers woken together cost about two statements, not one each;
- a read that starts outside the window (a consumer catching up from far behind, or
  a first read) goes to storage directly; once it reaches the window it joins it.

Exactness. The window only ever holds what storage reads returned, appended in order
after the window's end, and every such read is a gap-free prefix of what will ever
commit after where it started (see the backends). So the window is gap-free too, and a
read served from it returns exactly what a direct read could have: nothing skipped,
nothing twice, in order.

Freshness. "Nothing beyond the window's end" is an answer taken from the last fetch that
reached the head, if it began at most ``FRESHNESS`` ago, after the last wake-up of a
watcher of this source (``EventSource.watch`` records it before calling the watcher)
and after the last publish to it through an ``EventStore`` of this process
(``note_published``), those before the read began (a later wake-up starts another
pass of the consumer it wakes, and a read never waits on the wake-ups that keep
coming while it fetches). So a consumer woken for new events always reads past them, a
read after your own publish sees it, and polls by many groups in one interval share
one fetch. Only when the wake-up of another process's publish is lost can a poll answer
be up to ``FRESHNESS`` older than a direct read, on top of the poll interval. Plain event
sources (``shared_tail=False``, the default) never use this: they read what was
committed before the read began.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import weakref
from bisect import bisect_right

from eventmill.backends.base import EventStorage
from eventmill.events import EventSourceIdentifier, LogIdentifier, StoredEvent

WINDOW_EVENTS = 5_000
"""The most events a tail keeps; older ones are dropped (readers there read directly)."""
FRESHNESS = 0.5
"""Seconds a fetch that reached the head may answer "nothing newer" for (see above)."""
FETCH_EVENTS = 500
"""The least a tail fetches at a time (more when a reader asks for more)."""


def _sequence_number(event: StoredEvent) -> int:
    return event.sequence_number


class SharedTail:
    """The shared reader of one source (not a stream) on one backend and event loop.

    Use it only from that loop. ``read`` blocks for at most one storage read in flight
    plus one of its own; it raises what the storage read raised (StorageError).
    """

    def __init__(
        self,
        storage: EventStorage,
        identifier: EventSourceIdentifier,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.loop = loop
        self._storage = storage
        self._identifier = identifier
        self._events: list[StoredEvent] = []
        self._start: int | None = None  # the window holds every event in (start, end]
        self._end = 0
        self._head_seen_at = -math.inf  # then nothing after ``end`` was visible
        self._woken_at = -math.inf
        self._fetch: asyncio.Task[None] | None = None

    def follows(self, category: str) -> bool:
        """Whether events of ``category`` are in this tail's source."""
        identifier = self._identifier
        return isinstance(identifier, LogIdentifier) or identifier.category == category

    def woken(self) -> None:
        """Record that events may have been published (a watcher is being woken)."""
        self._woken_at = time.monotonic()

    async def read(self, after: int, limit: int) -> list[StoredEvent]:
        """Up to ``limit`` events after sequence number ``after``, in order."""
        asked_at = time.monotonic()
        while True:
            start = self._start
            if start is None or not start <= after <= self._end:
                return await self._read_directly(after, limit)
            first = bisect_right(self._events, after, key=_sequence_number)
            served = self._events[first : first + limit]
            if len(served) == limit:
                return served
            # Only a wake-up before this read began counts: one during its fetch starts
            # another pass anyway, and waiting for a fetch begun after the latest one
            # never returned while wake-ups kept coming (publishes to other partitions).
            if self._head_seen_at >= max(asked_at - FRESHNESS, min(self._woken_at, asked_at)):
                return served
            fetch = self._fetch
            if fetch is None or fetch.done():
                fetch = self._fetch = self.loop.create_task(
                    self._fetch_after_end(max(limit, FETCH_EVENTS)), name="eventmill-shared-tail"
                )
                fetch.add_done_callback(_retrieve)
            await asyncio.shield(fetch)

    async def _fetch_after_end(self, limit: int) -> None:
        started, end = time.monotonic(), self._end
        page = await self._storage.read(self._identifier, after=end, limit=limit)
        if self._start is None or self._end != end:  # re-anchored meanwhile
            return
        self._events.extend(page)
        if page:
            self._end = page[-1].sequence_number
        if len(page) < limit:
            self._head_seen_at = started
        self._trim()

    async def _read_directly(self, after: int, limit: int) -> list[StoredEvent]:
        """Read from storage; a reader at or beyond the window's end anchors it there."""
        started = time.monotonic()
        page = await self._storage.read(self._identifier, after=after, limit=limit)
        if self._start is None or after > self._end:
            self._events = list(page)
            self._start = after
            self._end = page[-1].sequence_number if page else after
            self._head_seen_at = started if len(page) < limit else -math.inf
            self._trim()
        return page

    def _trim(self) -> None:
        excess = len(self._events) - WINDOW_EVENTS
        if excess > 0:
            self._start = self._events[excess - 1].sequence_number
            del self._events[:excess]


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a fetch's failure seen: its waiters got it; a fetch nobody waits for is lost."""
    if not task.cancelled():
        task.exception()


_registry_lock = threading.Lock()
_registry: weakref.WeakKeyDictionary[
    EventStorage,
    weakref.WeakValueDictionary[
        tuple[asyncio.AbstractEventLoop, EventSourceIdentifier], SharedTail
    ],
] = weakref.WeakKeyDictionary()
_any_tail = False
"""Whether a tail was ever made in this process: until then a publish's
``note_published`` reads this global alone, not the weak dictionary's ``len``."""


def shared_tail(storage: EventStorage, identifier: EventSourceIdentifier) -> SharedTail:
    """The tail of ``identifier`` on ``storage`` for the running loop, made on first use
    and kept while an event source holds it. Never blocks."""
    global _any_tail
    loop = asyncio.get_running_loop()
    with _registry_lock:
        _any_tail = True
        tails = _registry.get(storage)
        if tails is None:
            tails = _registry[storage] = weakref.WeakValueDictionary()
        tail = tails.get((loop, identifier))
        if tail is None:
            tail = tails[(loop, identifier)] = SharedTail(storage, identifier, loop)
        return tail


def note_published(storage: EventStorage, category: str) -> None:
    """Record that events of ``category`` were just published to ``storage``, so its
    tails (on every loop) read past them. Never blocks for long."""
    if not _any_tail:  # the publish path of a process with no shared tails
        return
    with _registry_lock:
        tails = _registry.get(storage)
        found = [] if tails is None else list(tails.values())
    for tail in found:
        if tail.follows(category):
            tail.woken()

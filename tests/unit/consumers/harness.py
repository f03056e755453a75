"""Processors of every kind around one recording handler, for the consumer tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

from eventmill.backends.base import ConsumerTransaction
from eventmill.consumers import (
    AutoCommitEventIteratorProcessor,
    ConsumerProgress,
    EventProcessor,
    ManagedEventIteratorProcessor,
    Processor,
    TransactionalEventProcessor,
)
from eventmill.events import StoredEvent

KINDS = ["each", "function", "auto-commit", "managed", "transactional"]


class Boom(Exception):
    """The failure the recorder raises on purpose."""


class Recorder:
    """Records the sequence numbers it handles; fails or blocks at chosen ones."""

    def __init__(self, *, fail_at: int | None = None, block_at: int | None = None) -> None:
        self.seen: list[int] = []
        self.fail_at = fail_at
        self.block_at = block_at
        self.on_event: Callable[[StoredEvent], None] | None = None
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def handle(self, event: StoredEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)
        if event.sequence_number == self.fail_at:
            raise Boom(event.sequence_number)
        if event.sequence_number == self.block_at:
            self.reached.set()
            await self.release.wait()
        self.seen.append(event.sequence_number)


def processor_of(kind: str, recorder: Recorder) -> Processor:
    """A processor of ``kind`` that hands every event to ``recorder``."""
    if kind == "each":

        class Each(EventProcessor):
            async def process_event(self, event: StoredEvent) -> None:
                await recorder.handle(event)

        return Each()
    if kind == "function":
        return recorder.handle
    if kind == "auto-commit":

        class Auto(AutoCommitEventIteratorProcessor):
            async def process(self, events: AsyncIterator[StoredEvent]) -> None:
                async for event in events:
                    await recorder.handle(event)

        return Auto()
    if kind == "managed":

        class Managed(ManagedEventIteratorProcessor):
            async def process(
                self, events: AsyncIterator[StoredEvent], progress: ConsumerProgress
            ) -> None:
                async for event in events:
                    await recorder.handle(event)
                    progress.acknowledge(event)
                    await progress.commit()

        return Managed()
    assert kind == "transactional"

    class Transactional(TransactionalEventProcessor):
        async def process_events(
            self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
        ) -> None:
            for event in events:
                await recorder.handle(event)

    return Transactional()

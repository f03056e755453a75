"""What the drain workers (run as separate processes by the kill tests) share."""

from __future__ import annotations

from eventmill import EventConsumerStateStore, EventSourceConsumer
from eventmill.backends.postgres import PostgresBackend
from eventmill.consumers import ConsumerSettings, Processor
from eventmill.events import EventSourceIdentifier
from eventmill.sources import EventSource


async def drain(
    dsn: str,
    schema: str,
    source: EventSourceIdentifier,
    group: str,
    processor: Processor,
    *,
    page_size: int,
    every: int,
) -> None:
    """Consume ``source`` as ``group`` until a pass finds nothing, then print
    ``drained``. Blocks until then; raises what the consumer raises."""
    backend = await PostgresBackend.connect(dsn, schema=schema, min_size=1, max_size=2)
    try:
        consumer = EventSourceConsumer(
            EventSource(backend, source, page_size=page_size),
            processor,
            EventConsumerStateStore(backend.checkpoints, group, source),
            settings=ConsumerSettings(checkpoint_every=every),
        )
        while await consumer.consume_all():
            pass
        print("drained", flush=True)
    finally:
        await backend.close()

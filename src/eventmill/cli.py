"""The ``eventmill`` command. ``eventmill demo`` publishes and reads events on the
in-memory backend, printing what it did."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

from eventmill.backends.memory import InMemoryBackend
from eventmill.conditions import position_is, stream_is_empty
from eventmill.errors import EventmillError, UnmetWriteConditionError
from eventmill.events import NewEvent
from eventmill.store import EventStore


async def demo(events: int, streams: int) -> int:
    """Publish an order workflow over ``streams`` streams and read it back; 0 when it checks."""
    store = EventStore(InMemoryBackend())
    started = time.perf_counter()
    total = 0
    per_stream = max(events // streams, 1)
    for number in range(streams):
        stream = store.stream(category="orders", stream=f"order-{number}")
        await stream.publish(
            [NewEvent(name="order-placed", payload={"order": number, "total": number % 97})],
            condition=stream_is_empty(),
        )
        for line in range(per_stream - 1):
            await stream.publish(
                [NewEvent(name="line-added", payload={"line": line})],
                condition=position_is(line),
            )
        total += per_stream
    published = time.perf_counter() - started
    print(f"published {total} events to {streams} streams in {published:.2f}s")
    try:
        await store.stream(category="orders", stream="order-0").publish(
            [NewEvent(name="order-placed")], condition=stream_is_empty()
        )
    except UnmetWriteConditionError as error:
        print(f"a second 'order-placed' on order-0 was refused: {error}")
    read = 0
    previous = 0
    async for event in store.category("orders").iterate():
        assert event.sequence_number > previous
        previous = event.sequence_number
        read += 1
    print(f"read {read} events of category 'orders' back in order")
    if read != total:
        print(f"FAILED: published {total}, read {read}")
        return 1
    print("OK")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eventmill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="publish and read events in memory")
    demo_parser.add_argument("--events", type=int, default=20_000)
    demo_parser.add_argument("--streams", type=int, default=200)
    arguments = parser.parse_args(argv)
    try:
        return asyncio.run(demo(arguments.events, arguments.streams))
    except EventmillError as error:
        print(f"eventmill: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Partition identifiers: the stable stream hash, the allowed partition counts, buckets."""

from __future__ import annotations

import subprocess
import sys

import pytest

from eventmill import (
    CategoryIdentifier,
    CategoryPartitionIdentifier,
    EventProcessingNode,
    EventStore,
    InvalidIdentifierError,
    InvalidInputError,
    LogIdentifier,
    NewEvent,
    NodeMode,
    PartitioningChangedError,
    StoredEvent,
    StreamIdentifier,
    make_subscriber,
)
from eventmill.backends.memory import InMemoryBackend
from eventmill.broker.subscriber_manager import EventSubscriberManager
from eventmill.events import (
    PARTITION_BUCKETS,
    EventSourceIdentifier,
    identifier_from_json,
    stream_bucket,
    stream_hash,
)

# stream name, stream_hash, partition for 1, 2, 4, 16 and 64 partitions. Fixed here so a
# change of hash (which would move streams between partitions under running consumers)
# fails this test. Values are CRC-32 of the UTF-8 name.
HASHES = [
    ("order-1", 3769860079, (0, 1, 3, 15, 47)),
    ("order-2", 2042244693, (0, 1, 1, 5, 21)),
    ("order-3", 247275203, (0, 1, 3, 3, 3)),
    ("customer-42", 1241360405, (0, 1, 1, 5, 21)),
    ("a", 3904355907, (0, 1, 3, 3, 3)),
    ("b", 1908338681, (0, 1, 1, 9, 57)),
    ("ünïcødé-✓", 2531232385, (0, 1, 1, 1, 1)),
    ("Stream With Spaces", 293765829, (0, 1, 1, 5, 5)),
    ("stream-5", 4260282124, (0, 0, 0, 12, 12)),
    ("order-10", 3297678263, (0, 1, 3, 7, 55)),
]
COUNTS = (1, 2, 4, 16, 64)


@pytest.mark.parametrize(("stream", "hashed", "partitions"), HASHES)
def test_the_stream_hash_and_partitions_are_fixed(
    stream: str, hashed: int, partitions: tuple[int, ...]
) -> None:
    assert stream_hash(stream) == hashed
    assert stream_bucket(stream) == hashed % 64
    for count, expected in zip(COUNTS, partitions, strict=True):
        owners = [
            part
            for part in range(count)
            if CategoryPartitionIdentifier("c", part, count).contains(stream)
        ]
        assert owners == [expected]


def test_the_hash_is_the_same_in_another_process_with_another_hash_seed() -> None:
    names = [stream for stream, _, _ in HASHES]
    script = (
        "import sys\nfrom eventmill.events import stream_hash\n"
        "print(','.join(str(stream_hash(n)) for n in sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *names],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PYTHONIOENCODING": "utf-8"},
    )
    assert result.stdout.strip() == ",".join(str(hashed) for _, hashed, _ in HASHES)


@pytest.mark.parametrize("count", [1, 2, 4, 8, 16, 32, 64])
def test_a_partition_is_exactly_its_buckets(count: int) -> None:
    partitions = [CategoryPartitionIdentifier("c", part, count) for part in range(count)]
    assert sorted(b for p in partitions for b in p.buckets) == list(range(PARTITION_BUCKETS))
    for number in range(300):
        stream = f"s-{number}"
        (owner,) = [p for p in partitions if p.contains(stream)]
        assert stream_bucket(stream) in owner.buckets


@pytest.mark.parametrize("count", [0, -2, 3, 6, 12, 48, 128, 1024])
def test_partition_counts_other_than_powers_of_two_up_to_64_are_refused(count: int) -> None:
    with pytest.raises(InvalidIdentifierError, match="power of two from 1 to 64"):
        CategoryPartitionIdentifier("c", 0, count)


@pytest.mark.parametrize(
    ("partition", "partitions", "message"),
    [(4, 4, "partition must be 0 to 3"), (-1, 4, "partition must be 0 to 3"), (0, 2.0, "int")],
)
def test_bad_partition_numbers_are_refused(
    partition: int, partitions: object, message: str
) -> None:
    with pytest.raises(InvalidIdentifierError, match=message):
        CategoryPartitionIdentifier("c", partition, partitions)  # type: ignore[arg-type]


def test_partition_identifiers_round_trip_and_are_validated_from_json() -> None:
    identifier = CategoryPartitionIdentifier("orders", 5, 16)
    assert identifier_from_json(identifier.to_json()) == identifier
    with pytest.raises(InvalidIdentifierError, match="power of two"):
        identifier_from_json({**identifier.to_json(), "partitions": 24})


# --- Partitioned subscriptions and the guard against changing the partition count ---


async def handle(event: StoredEvent) -> None:
    """A processor that does nothing."""


def test_make_subscriber_asks_for_each_partition_of_each_category() -> None:
    subscriber = make_subscriber(
        InMemoryBackend(),
        group="g",
        sources=[CategoryIdentifier("a"), CategoryIdentifier("b")],
        processor=handle,
        partitions=4,
    )
    assert list(subscriber.subscription_requests) == [
        *(CategoryPartitionIdentifier("a", n, 4) for n in range(4)),
        *(CategoryPartitionIdentifier("b", n, 4) for n in range(4)),
    ]
    plain = make_subscriber(InMemoryBackend(), group="g", sources=LogIdentifier(), processor=handle)
    assert list(plain.subscription_requests) == [LogIdentifier()]


def test_make_subscriber_refuses_bad_partitioning() -> None:
    with pytest.raises(InvalidIdentifierError, match="power of two"):
        make_subscriber(
            InMemoryBackend(),
            group="g",
            sources=CategoryIdentifier("a"),
            processor=handle,
            partitions=3,
        )
    with pytest.raises(InvalidInputError, match="only a category can be partitioned"):
        make_subscriber(
            InMemoryBackend(),
            group="g",
            sources=StreamIdentifier("a", "s"),
            processor=handle,
            partitions=2,
        )
    with pytest.raises(InvalidInputError, match="reset_repartitioned must be a bool"):
        make_subscriber(
            InMemoryBackend(),
            group="g",
            sources=CategoryIdentifier("a"),
            processor=handle,
            reset_repartitioned=1,  # type: ignore[arg-type]
        )


async def save(
    backend: InMemoryBackend, group: str, source: EventSourceIdentifier, after: int | None
) -> None:
    current = await backend.checkpoints.get(group, source)
    await backend.checkpoints.save(
        group, source, after, expected_version=None if current is None else current.version
    )


async def test_a_changed_partition_count_is_refused_while_the_group_has_progress() -> None:
    backend = InMemoryBackend()
    for number in range(8):
        await save(backend, "g", CategoryPartitionIdentifier("orders", number, 8), 10 + number)
    await save(backend, "other-group", CategoryPartitionIdentifier("orders", 0, 2), 5)
    await save(backend, "g", CategoryIdentifier("customers"), 7)
    same = make_subscriber(
        backend, group="g", sources=CategoryIdentifier("orders"), processor=handle, partitions=8
    )
    await same.check_partitioning()
    changed = make_subscriber(
        backend, group="g", sources=CategoryIdentifier("orders"), processor=handle, partitions=16
    )
    with pytest.raises(PartitioningChangedError, match=r"'orders' in 16 partition\(s\).* in 8"):
        await changed.check_partitioning()
    unpartitioned = make_subscriber(
        backend, group="g", sources=CategoryIdentifier("orders"), processor=handle
    )
    with pytest.raises(PartitioningChangedError, match="in 1 partition"):
        await unpartitioned.check_partitioning()
    now_partitioned = make_subscriber(
        backend, group="g", sources=CategoryIdentifier("customers"), processor=handle, partitions=2
    )
    with pytest.raises(PartitioningChangedError, match="'customers' in 2"):
        await now_partitioned.check_partitioning()
    assert (
        await backend.checkpoints.get("g", CategoryPartitionIdentifier("orders", 3, 8))
    ).after == 13  # type: ignore[union-attr]


async def test_a_reset_processes_the_category_again_from_the_start_under_the_new_count() -> None:
    backend = InMemoryBackend()
    for number in range(4):
        await save(backend, "g", CategoryPartitionIdentifier("orders", number, 4), 10)
    await save(backend, "g", CategoryPartitionIdentifier("orders", 1, 2), 3)  # an older change
    await save(backend, "g", CategoryIdentifier("customers"), 7)
    resetting = make_subscriber(
        backend,
        group="g",
        sources=CategoryIdentifier("orders"),
        processor=handle,
        partitions=2,
        reset_repartitioned=True,
    )
    await resetting.check_partitioning()
    kept = {str(c.source): c.after for c in await backend.checkpoints.list("g")}
    assert kept == {
        **{str(CategoryPartitionIdentifier("orders", n, 4)): None for n in range(4)},
        str(CategoryPartitionIdentifier("orders", 1, 2)): None,
        "category:customers": 7,
    }
    await save(backend, "g", CategoryPartitionIdentifier("orders", 1, 2), 20)
    # A second instance asking for a reset finds nothing to reset: progress stays.
    await resetting.check_partitioning()
    after = await backend.checkpoints.get("g", CategoryPartitionIdentifier("orders", 1, 2))
    assert after is not None and after.after == 20
    await make_subscriber(
        backend, group="g", sources=CategoryIdentifier("orders"), processor=handle, partitions=2
    ).check_partitioning()


async def test_registration_refuses_a_changed_partition_count_and_records_nothing() -> None:
    backend = InMemoryBackend()
    await save(backend, "g", CategoryPartitionIdentifier("orders", 0, 4), 1)
    manager = EventSubscriberManager(backend, "node-1")
    changed = make_subscriber(
        backend, group="g", sources=CategoryIdentifier("orders"), processor=handle, partitions=8
    )
    with pytest.raises(PartitioningChangedError):
        await manager.register(changed)
    assert await backend.subscribers.list() == [] and manager.subscribers == []
    kept = make_subscriber(
        backend, group="g", sources=CategoryIdentifier("orders"), processor=handle, partitions=4
    )
    await manager.register(kept)
    assert [record.id for record in await backend.subscribers.list()] == [kept.id]


async def test_a_node_refuses_to_start_a_repartitioned_subscriber_unless_reset() -> None:
    backend = InMemoryBackend()
    await save(backend, "g", CategoryPartitionIdentifier("orders", 0, 8), 3)
    store = EventStore(backend)
    await store.stream(category="orders", stream="order-1").publish([NewEvent(name="placed")])
    refused = EventProcessingNode(backend, mode=NodeMode.BOTH, node_id="n1")
    refused.register_subscriber(
        group="g", source=CategoryIdentifier("orders"), processor=handle, partitions=16
    )
    with pytest.raises(PartitioningChangedError, match="in 8"):
        async with refused:
            pass
    seen: list[int] = []

    async def record(event: StoredEvent) -> None:
        seen.append(event.sequence_number)

    node = EventProcessingNode(backend, mode=NodeMode.BOTH, node_id="n2")
    node.register_subscriber(
        group="g",
        source=CategoryIdentifier("orders"),
        processor=record,
        partitions=16,
        reset_repartitioned=True,
    )
    async with node:
        await node.wait_caught_up(timeout=10)
    assert seen == [1]
    old = await backend.checkpoints.get("g", CategoryPartitionIdentifier("orders", 0, 8))
    assert old is not None and old.after is None

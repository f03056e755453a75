"""Category, stream, event and group names full of quotes, semicolons, placeholders and
unicode are stored and read back intact on every backend, or refused before any I/O."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from eventmill import (
    CategoryIdentifier,
    CategoryPartitionIdentifier,
    EventConsumerStateStore,
    EventSourceIdentifier,
    EventStore,
    InvalidEventError,
    InvalidIdentifierError,
    NewEvent,
    StreamIdentifier,
)
from eventmill.backends.base import Backend
from eventmill.events import stream_hash
from tests.fuzz.log_checks import wait_for_log_length
from tests.fuzz.strategies import any_names, hazardous_names

ON_BACKEND = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@given(category=any_names, stream=any_names, name=any_names)
@settings(max_examples=300, deadline=None)
def test_names_are_valid_identifiers_or_refused(
    category: object, stream: object, name: object
) -> None:
    try:
        identifier = StreamIdentifier(category, stream)  # type: ignore[arg-type]
    except InvalidIdentifierError:
        identifier = None
    valid = all(isinstance(value, str) for value in (category, stream))
    if identifier is not None:
        assert valid
        assert identifier.category == category
        assert identifier.stream == stream
    try:
        event = NewEvent(name=name)  # type: ignore[arg-type]
    except InvalidEventError:
        return
    assert event.name == name


async def test_hazardous_names_round_trip_through_every_read(backend: Backend) -> None:
    store = EventStore(backend)
    written: list[tuple[str, str, str]] = []

    @given(category=hazardous_names, stream=hazardous_names, name=hazardous_names)
    @settings(max_examples=40, deadline=None)
    def draw(category: str, stream: str, name: str) -> None:
        written.append((category, stream, name))

    draw()
    seen_streams: set[tuple[str, str]] = set()
    for category, stream, name in written:
        handle = store.stream(category=category, stream=stream)
        before = len(await handle.read())
        [published] = await handle.publish([NewEvent(name=name, payload={name: stream})])
        seen_streams.add((category, stream))
        assert (published.category, published.stream, published.name) == (category, stream, name)
        read = (await handle.read(after=before - 1 if before else None))[0]
        assert (read.category, read.stream, read.name) == (category, stream, name)
        assert read.payload == {name: stream}
        in_category = await store.category(category).read()
        assert published.sequence_number in {event.sequence_number for event in in_category}
        assert all(event.category == category for event in in_category)
        partition = CategoryPartitionIdentifier(category, stream_hash(stream) % 8, 8)
        in_partition = await store.source(partition).read()
        assert published.sequence_number in {event.sequence_number for event in in_partition}
        latest = await store.source(CategoryIdentifier(category)).latest()
        assert latest is not None
        assert latest.category == category
    log = await wait_for_log_length(store, len(written))
    assert [(e.category, e.stream, e.name) for e in log] == written


@given(group=hazardous_names, category=hazardous_names, stream=hazardous_names)
@ON_BACKEND
async def test_hazardous_group_and_source_names_keep_their_checkpoints(
    backend: Backend, group: str, category: str, stream: str
) -> None:
    sources: list[EventSourceIdentifier] = [
        CategoryIdentifier(category),
        StreamIdentifier(category, stream),
    ]
    for number, source in enumerate(sources):
        state = EventConsumerStateStore(backend.checkpoints, group, source)
        await state.load()
        saved = await state.save(number + 1000)
        again = EventConsumerStateStore(backend.checkpoints, group, source)
        assert await again.load() == number + 1000
        assert again.known == saved
    listed = {(c.group, c.source) for c in await backend.checkpoints.list(group)}
    assert {(group, source) for source in sources} <= listed
    assert all(listed_group == group for listed_group, _ in listed)

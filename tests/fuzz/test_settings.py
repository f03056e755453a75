"""Settings, schema names and read arguments: arbitrary values either work or raise an
InvalidInputError (InvalidSettingsError for settings) before any I/O."""

from __future__ import annotations

import contextlib
import uuid
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool

from eventmill import (
    CategoryIdentifier,
    EventConsumerStateStore,
    EventStore,
    InvalidInputError,
    InvalidSettingsError,
    NewEvent,
    PollingService,
    RetryErrorHandler,
    ServiceManager,
    StorageError,
)
from eventmill.backends.base import Backend
from eventmill.backends.memory import InMemoryBackend
from eventmill.backends.postgres import PostgresBackend
from eventmill.consumers import ConsumerSettings
from eventmill.services.error_handlers import ConstantBackoff, ExponentialBackoff
from tests.fuzz.strategies import HAZARDS, huge_ints
from tests.postgres_support import TEST_DSN, drop_schema

UNREACHABLE_DSN = "postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=1"
"""A DSN nothing listens on: touching it would raise StorageError, not a settings error."""

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=20_000),
    huge_ints,
    st.floats(),
    st.text(max_size=4),
    st.sampled_from([timedelta(seconds=-1), timedelta(0), timedelta(seconds=1), [1], object()]),
)
schema_names = st.one_of(
    st.from_regex(r"\A[a-z_][a-z0-9_]{0,62}\Z"),
    st.text(max_size=70),
    st.lists(st.sampled_from([*HAZARDS, "A", "Z", "é", "a"]), max_size=5).map("".join),
    st.just("a" * 64),
    junk,
)


@given(schema=schema_names)
@settings(max_examples=300, deadline=None)
async def test_schema_names_are_checked_before_any_io(schema: Any) -> None:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(UNREACHABLE_DSN, open=False)
    try:
        backend = PostgresBackend(pool, schema=schema)
    except InvalidSettingsError:
        with pytest.raises(InvalidSettingsError):
            await PostgresBackend.connect(UNREACHABLE_DSN, schema=schema)
        return
    assert backend.schema == schema
    assert isinstance(schema, str)
    assert schema == schema.lower()
    assert len(schema.encode()) <= 63


@given(min_size=junk, max_size=junk, connect_timeout=junk)
@settings(max_examples=150, deadline=None)
async def test_connect_settings_are_checked_before_any_io(
    min_size: Any, max_size: Any, connect_timeout: Any
) -> None:
    with pytest.raises((InvalidSettingsError, StorageError)) as raised:
        await PostgresBackend.connect(
            UNREACHABLE_DSN, min_size=min_size, max_size=max_size, connect_timeout=connect_timeout
        )
    valid = (
        type(min_size) is int
        and type(max_size) is int
        and 0 <= min_size <= max_size
        and max_size >= 1
        and isinstance(connect_timeout, timedelta)
        and connect_timeout > timedelta(0)
    )
    assert isinstance(raised.value, StorageError) == valid


@pytest.mark.postgres
@pytest.mark.parametrize("schema", ["_", "a" * 63, "x_1__", "select", "public_events"])
async def test_unusual_valid_schema_names_work(schema: str) -> None:
    backend = await PostgresBackend.connect(TEST_DSN, schema=schema, min_size=1, max_size=2)
    try:
        await backend.install_schema()
        store = EventStore(backend)
        await store.stream(category="c", stream="s").publish([NewEvent(name="e")])
        [event] = await store.stream(category="c", stream="s").read()
        assert event.name == "e"
    finally:
        await backend.close()
        await drop_schema(schema)


@given(after=junk, page_size=junk, limit=junk)
@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
async def test_read_arguments_work_or_are_refused(
    backend: Backend, after: Any, page_size: Any, limit: Any
) -> None:
    store = EventStore(backend)
    stream = store.stream(category="reads", stream="s")
    if not await stream.read():
        await stream.publish([NewEvent(name="e", payload={"n": n}) for n in range(5)])
    for handle in (stream, store.category("reads"), store.log()):
        try:
            read = await handle.read(after=after, limit=limit)
        except InvalidInputError:
            assert not (
                (after is None or (type(after) is int and after >= 0))
                and (limit is None or (type(limit) is int and limit >= 0))
            )
        else:
            assert len(read) <= (5 if limit is None else limit)
        try:
            iterated = [event async for event in handle.iterate(after=after, page_size=page_size)]
        except InvalidInputError:
            pass
        else:
            assert len(iterated) <= 5


@given(after=junk, epoch=junk)
@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
async def test_checkpoint_places_and_epochs_are_stored_exactly_or_refused(
    backend: Backend, after: Any, epoch: Any
) -> None:
    source = CategoryIdentifier(str(uuid.uuid4()))
    try:
        state = EventConsumerStateStore(backend.checkpoints, "g", source, epoch=epoch)
    except InvalidSettingsError:
        return
    await state.load()
    try:
        saved = await state.save(after)
    except InvalidInputError:
        assert not (after is None or (type(after) is int and 0 <= after < 2**63))
        return
    stored = await backend.checkpoints.get("g", source)
    assert stored == saved
    assert stored.after == after
    assert type(stored.after) is type(after)


def _builds_or_refuses(make: Any) -> None:
    with contextlib.suppress(InvalidSettingsError):
        make()


@given(first=junk, second=junk, third=junk, fourth=junk)
def test_service_settings_build_or_raise_invalid_settings_error(
    first: Any, second: Any, third: Any, fourth: Any
) -> None:
    class Nothing(PollingService):
        pass

    _builds_or_refuses(lambda: ConstantBackoff(first))
    _builds_or_refuses(
        lambda: ExponentialBackoff(initial=first, maximum=second, multiplier=third, jitter=fourth)
    )
    _builds_or_refuses(lambda: ExponentialBackoff(multiplier=third))
    _builds_or_refuses(lambda: ExponentialBackoff(jitter=fourth))
    _builds_or_refuses(lambda: RetryErrorHandler(max_attempts=first))
    _builds_or_refuses(lambda: ServiceManager(stop_timeout=second))
    _builds_or_refuses(lambda: ConsumerSettings(checkpoint_every=first, checkpoint_at_end=second))


@given(poll_interval=junk)
def test_polling_interval_builds_or_raises_invalid_settings_error(poll_interval: Any) -> None:
    from eventmill.services import Service

    class Idle(Service[None]):
        async def execute(self) -> None:
            return None

    _builds_or_refuses(lambda: PollingService(Idle(), poll_interval))


def test_in_memory_backend_needs_no_settings() -> None:
    assert isinstance(InMemoryBackend(), Backend)

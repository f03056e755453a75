"""Shared fixtures. ``backend`` is parametrised over every backend, so a contract test
written once runs against each."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from eventmill.backends.base import Backend
from eventmill.backends.memory import InMemoryBackend
from eventmill.store import EventStore


@pytest.fixture(params=["memory"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """A fresh, empty backend of each kind."""
    fresh = InMemoryBackend()
    yield fresh
    await fresh.close()


@pytest.fixture
def store(backend: Backend) -> EventStore:
    return EventStore(backend)

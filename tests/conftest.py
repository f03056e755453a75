"""Shared fixtures. ``backend`` is parametrised over every backend, so a contract test
written once runs against each."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import settings

from eventmill.backends.base import Backend
from eventmill.backends.memory import InMemoryBackend
from eventmill.store import EventStore
from tests.postgres_support import fresh_postgres_backend
from tests.servers import Bouncer, PrivateCluster

# In CI, property tests replay the same examples every run (a failure there is then a
# change of code, not of luck); elsewhere each run explores new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.postgres)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """A fresh, empty backend of each kind (PostgreSQL: a schema of its own, dropped after)."""
    if request.param == "postgres":
        async with fresh_postgres_backend() as postgres:
            yield postgres
        return
    fresh = InMemoryBackend()
    yield fresh
    await fresh.close()


@pytest.fixture
def store(backend: Backend) -> EventStore:
    return EventStore(backend)


@pytest.fixture(scope="session")
def private_cluster() -> Iterator[PrivateCluster]:
    """A PostgreSQL cluster of this test session's own (initdb in a temporary folder),
    with prepared transactions enabled; removed at the end of the session."""
    cluster = PrivateCluster.create(
        {"max_prepared_transactions": "20", "max_connections": "200", "wal_level": "replica"}
    )
    yield cluster
    cluster.remove()


@pytest.fixture
def own_cluster() -> Iterator[PrivateCluster]:
    """A PostgreSQL cluster of this test's own, for tests that stop or restart it;
    removed afterwards."""
    cluster = PrivateCluster.create({"max_connections": "100"})
    yield cluster
    cluster.remove()


@pytest.fixture(scope="session")
def standby(private_cluster: PrivateCluster) -> Iterator[PrivateCluster]:
    """A streaming hot standby of ``private_cluster``."""
    copy = private_cluster.standby()
    yield copy
    copy.remove()


@pytest.fixture(scope="session")
def transaction_bouncer(private_cluster: PrivateCluster) -> Iterator[Bouncer]:
    """PgBouncer in transaction pooling mode in front of ``private_cluster``, with 3
    server connections per database: clients contend for them, so a client's
    transactions run in changing server sessions."""
    bouncer = Bouncer(private_cluster, "transaction", pool_size=3)
    yield bouncer
    bouncer.stop()


@pytest.fixture(scope="session")
def session_bouncer(private_cluster: PrivateCluster) -> Iterator[Bouncer]:
    """PgBouncer in session pooling mode in front of ``private_cluster``."""
    bouncer = Bouncer(private_cluster, "session")
    yield bouncer
    bouncer.stop()

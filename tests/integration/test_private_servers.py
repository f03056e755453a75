"""The private-server harness (tests/servers.py): each fixture gives the server it says."""

from __future__ import annotations

import psycopg
import pytest

from tests import servers
from tests.servers import Bouncer, PrivateCluster

pytestmark = pytest.mark.postgres


def scalar(dsn: str, query: str) -> object:
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(query).fetchone()
        assert row is not None
        return row[0]


def test_the_private_cluster_has_its_settings(private_cluster: PrivateCluster) -> None:
    assert scalar(private_cluster.dsn(), "SHOW max_prepared_transactions") == "20"
    assert scalar(private_cluster.dsn(), "SELECT inet_server_addr()::text") == "127.0.0.1/32"


def test_the_standby_is_in_recovery_and_streams(
    private_cluster: PrivateCluster, standby: PrivateCluster
) -> None:
    assert scalar(standby.dsn(), "SELECT pg_is_in_recovery()") is True
    assert scalar(private_cluster.dsn(), "SELECT count(*) FROM pg_stat_replication") == 1


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_each_bouncer_forwards_to_the_private_cluster(
    mode: str,
    private_cluster: PrivateCluster,
    transaction_bouncer: Bouncer,
    session_bouncer: Bouncer,
) -> None:
    bouncer = transaction_bouncer if mode == "transaction" else session_bouncer
    assert bouncer.pool_mode == mode and bouncer.port != private_cluster.port
    assert scalar(bouncer.dsn(), "SELECT current_setting('port')::int") == private_cluster.port


def test_a_stop_that_does_not_end_is_made_immediate(
    own_cluster: PrivateCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A smart stop waits for clients to leave: with one staying, it cannot end, and
    ``stop`` finishes it as an immediate stop after ``STOP_SECONDS``."""
    monkeypatch.setattr(servers, "STOP_SECONDS", 1)
    with psycopg.connect(own_cluster.dsn(), autocommit=True):
        own_cluster.stop("smart")
        assert not own_cluster.running()

"""No skipped events in the PostgreSQL deployments teams run: any default isolation
level, prepared (2PC) publishes, restored tables, hot standbys, PgBouncer, versions.

These run on the session's private cluster (tests/servers.py), which allows prepared
transactions, never on the shared server."""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from eventmill import NewEvent, StoredEvent
from eventmill.backends.postgres import PostgresBackend, server_checks
from eventmill.errors import InvalidSettingsError, SchemaError, StorageError
from eventmill.store import EventSourceHandle, EventStore
from tests.integration.test_postgres_ordering import raw_publish_numbered, wait_until
from tests.postgres_support import unique_schema_name
from tests.servers import PG_BIN, Bouncer, PrivateCluster

pytestmark = pytest.mark.postgres

ISOLATION_LEVELS = ["read committed", "repeatable read", "serializable"]


def isolation_option(level: str) -> str:
    return "-c default_transaction_isolation=" + level.replace(" ", r"\ ")


@asynccontextmanager
async def private_backend(
    dsn: str, *, max_size: int = 6, pool_dsn: str | None = None
) -> AsyncIterator[PostgresBackend]:
    """A backend over ``dsn`` in a new schema, installed, dropped afterwards: on a pool
    of the test's own, or with ``pool_dsn`` made by ``connect`` with its pool over
    ``pool_dsn`` and ``dsn`` as its direct DSN."""
    schema = unique_schema_name()
    async with AsyncConnectionPool(
        dsn, min_size=1, max_size=max_size, kwargs={"autocommit": True}, open=False
    ) as pool:
        await pool.wait()
        if pool_dsn is None:
            backend = PostgresBackend(pool, schema=schema)
        else:
            backend = await PostgresBackend.connect(
                pool_dsn, direct_dsn=dsn, schema=schema, max_size=max_size
            )
        await backend.install_schema()
        try:
            yield backend
        finally:
            await backend.close()
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
                await roll_back_prepared(connection)
                await connection.execute(
                    sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema))
                )


async def database_defaulting_to(cluster: PrivateCluster, isolation: str) -> str:
    """A database of ``cluster`` whose default isolation is ``isolation`` (made once):
    PgBouncer passes no ``options`` from a DSN, a database's default reaches through."""
    name = "em_" + isolation.replace(" ", "_")
    async with await psycopg.AsyncConnection.connect(cluster.dsn(), autocommit=True) as admin:
        cursor = await admin.execute("SELECT FROM pg_database WHERE datname = %s", (name,))
        if await cursor.fetchone() is None:
            await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            await admin.execute(
                sql.SQL("ALTER DATABASE {} SET default_transaction_isolation = {}").format(
                    sql.Identifier(name), sql.Literal(isolation)
                )
            )
    return name


async def roll_back_prepared(connection: psycopg.AsyncConnection[Any]) -> None:
    """Roll back the prepared transactions a test left (a failed one may leave some)."""
    cursor = await connection.execute("SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'em-%'")
    for (gid,) in await cursor.fetchall():
        await connection.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))


def events(count: int) -> list[NewEvent]:
    return [NewEvent(name="happened", payload={"n": number}) for number in range(count)]


CATEGORIES = ["alpha", "beta", "gamma"]
WRITERS = 6  # api, slow (open transactions, some rolled back), two-phase, twice each
EVENTS_PER_WRITER = 100


DEPLOYMENTS = [(level, "direct") for level in ISOLATION_LEVELS] + [
    (level, "pgbouncer transaction mode + direct dsn")
    for level in ("read committed", "serializable")
]


@pytest.mark.parametrize(("isolation", "deployment"), DEPLOYMENTS)
async def test_readers_miss_nothing_under_any_default_isolation_with_2pc_publishers(
    isolation: str, deployment: str, private_cluster: PrivateCluster, transaction_bouncer: Bouncer
) -> None:
    """Writers publish through EventStore, in slow transactions (a fifth rolled back)
    and in prepared transactions committed or rolled back later, while readers of the
    log and of every category poll throughout; the server's default isolation level is
    ``isolation`` for every connection (readers included). The backend connects
    directly, or has its pool behind PgBouncer in transaction mode (its sessions over
    a direct DSN); the raw writers connect directly."""
    if deployment == "direct":
        dsn, pool_dsn = private_cluster.dsn(options=isolation_option(isolation)), None
    else:
        database = await database_defaulting_to(private_cluster, isolation)
        dsn, pool_dsn = private_cluster.dsn(database), transaction_bouncer.dsn(database)
    async with private_backend(dsn, pool_dsn=pool_dsn) as backend:
        store = EventStore(backend)
        committed: dict[str, str] = {}  # id -> category
        rolled_back: set[str] = set()
        prepared = 0
        last_committed = 0
        stop_polling = asyncio.Event()

        def record(ids: list[str], category: str, last: int) -> None:
            nonlocal last_committed
            committed.update(dict.fromkeys(ids, category))
            last_committed = max(last_committed, last)

        async def api_writer(rng: random.Random) -> None:
            written = 0
            while written < EVENTS_PER_WRITER:
                count = min(rng.randint(1, 4), EVENTS_PER_WRITER - written)
                category = rng.choice(CATEGORIES)
                stream = store.stream(category=category, stream=f"s{rng.randrange(10)}")
                stored = await stream.publish(events(count))
                record([e.id for e in stored], category, stored[-1].sequence_number)
                written += count

        async def transaction_writer(rng: random.Random, *, two_phase: bool) -> None:
            nonlocal prepared
            written = 0
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
                while written < EVENTS_PER_WRITER:
                    count = min(rng.randint(1, 4), EVENTS_PER_WRITER - written)
                    category = rng.choice(CATEGORIES)
                    roll_back = rng.random() < 0.2
                    await connection.execute("BEGIN")
                    try:
                        ids, last = await raw_publish_numbered(
                            connection, backend, category, f"s{rng.randrange(10)}", count
                        )
                        if two_phase:
                            gid = sql.Literal(f"em-{secrets.token_hex(8)}")
                            await connection.execute(sql.SQL("PREPARE TRANSACTION {}").format(gid))
                            prepared += 1
                        if rng.random() < 0.5:
                            await asyncio.sleep(rng.uniform(0, 0.03))  # hold it open
                        end = "ROLLBACK" if roll_back else "COMMIT"
                        if two_phase:
                            await connection.execute(sql.SQL(end + " PREPARED {}").format(gid))
                        else:
                            await connection.execute(end)
                    except psycopg.errors.SerializationFailure:
                        # Under repeatable read or serializable a concurrent write to the
                        # stream fails the publish, or a commit; it is rolled back.
                        if connection.info.transaction_status != TransactionStatus.IDLE:
                            await connection.execute("ROLLBACK")
                        continue
                    if roll_back:
                        rolled_back.update(ids)
                    else:
                        record(ids, category, last)
                        written += count

        async def writer(number: int) -> None:
            rng = random.Random(number)
            if number % 3 == 0:
                await api_writer(rng)
            else:
                await transaction_writer(rng, two_phase=number % 3 == 2)

        async def reader(handle: EventSourceHandle) -> list[StoredEvent]:
            seen: list[StoredEvent] = []
            after: int | None = None
            while True:
                stopping = stop_polling.is_set()
                page = await handle.read(after=after, limit=200)
                seen.extend(page)
                if page:
                    after = page[-1].sequence_number
                elif stopping:
                    return seen
                else:
                    await asyncio.sleep(0.003)  # poll again

        async def everything_visible() -> bool:
            latest = await store.log().latest()
            return latest is not None and latest.sequence_number >= last_committed

        handles = [store.log(), *(store.category(c) for c in CATEGORIES)]
        async with asyncio.timeout(60):
            readers = [asyncio.create_task(reader(handle)) for handle in handles]
            try:
                await asyncio.gather(*(writer(number) for number in range(WRITERS)))
                await wait_until(everything_visible)
                stop_polling.set()
                results = await asyncio.gather(*readers)
            finally:
                for task in readers:
                    task.cancel()
        assert len(committed) == WRITERS * EVENTS_PER_WRITER
        assert rolled_back and not rolled_back & set(committed) and prepared
        for handle, seen in zip(handles, results, strict=True):
            numbers = [event.sequence_number for event in seen]
            assert numbers == sorted(set(numbers)), f"{handle}: out of order or duplicated"
            category = getattr(handle.identifier, "category", None)
            wanted = {i for i, c in committed.items() if category in (None, c)}
            ids = {event.id for event in seen}
            assert not ids - wanted, f"{handle}: rolled-back events seen"
            assert not wanted - ids, f"{handle}: {len(wanted - ids)} of {len(wanted)} skipped"


async def test_an_orphaned_prepared_publish_holds_readers_back_and_is_not_skipped(
    private_cluster: PrivateCluster,
) -> None:
    async with (
        private_backend(private_cluster.dsn()) as backend,
        await psycopg.AsyncConnection.connect(private_cluster.dsn(), autocommit=True) as holder,
    ):
        store = EventStore(backend)
        await holder.execute("BEGIN")
        held, _ = await raw_publish_numbered(holder, backend, "c", "held", 2)
        name = f"em-{secrets.token_hex(8)}"
        gid = sql.Literal(name)
        await holder.execute(sql.SQL("PREPARE TRANSACTION {}").format(gid))
        later = await store.stream(category="c", stream="later").publish(events(1))
        # The prepared publish belongs to no session; it still holds readers back.
        assert await store.log().read() == []
        assert await store.category("c").read() == []
        assert await store.stream(category="c", stream="later").read() == later
        # ... and shows as the reason.
        (reason,) = await backend.events.publishers_in_flight()
        assert reason.prepared_as == name and reason.pid is None
        assert reason.since is not None
        holdback = await backend.events.read_holdback()
        assert holdback is not None and holdback.oldest == reason
        assert holdback.events_beyond == 1  # `later`, committed behind it
        await holder.execute(sql.SQL("COMMIT PREPARED {}").format(gid))
        assert await backend.events.publishers_in_flight() == []
        assert [e.id for e in await store.log().read()] == [*held, later[0].id]
        assert [e.id for e in await store.category("c").read()] == [*held, later[0].id]


async def test_pgbouncer_in_transaction_mode_is_refused_with_one_line(
    transaction_bouncer: Bouncer,
) -> None:
    with pytest.raises(StorageError) as refused:
        await PostgresBackend.connect(transaction_bouncer.dsn())
    message = str(refused.value)
    assert "\n" not in message
    assert "pool_mode = transaction" in message and "pool_mode = session" in message


async def test_pgbouncer_in_transaction_mode_needs_a_direct_dsn_to_the_same_database(
    private_cluster: PrivateCluster, transaction_bouncer: Bouncer
) -> None:
    other = await database_defaulting_to(private_cluster, "read committed")
    with pytest.raises(StorageError, match="lead to different databases") as elsewhere:
        await PostgresBackend.connect(
            transaction_bouncer.dsn(), direct_dsn=private_cluster.dsn(other)
        )
    assert "\n" not in str(elsewhere.value)
    with pytest.raises(StorageError, match="pool_mode = session"):
        await PostgresBackend.connect(
            transaction_bouncer.dsn(), direct_dsn=transaction_bouncer.dsn()
        )
    backend = await PostgresBackend.connect(
        transaction_bouncer.dsn(), direct_dsn=private_cluster.dsn(), schema=unique_schema_name()
    )
    try:
        assert backend.transaction_pooled
        await backend.install_schema()
        holdback = await backend.events.read_holdback()
        assert holdback is not None and holdback.oldest is None
        lock = await backend.locks.try_lock("leader")
        assert lock is not None and await lock.confirm()
        holder = await backend.locks.holder("leader")  # seen through the pooler
        assert holder is not None and holder.session == lock.backend_pid
        await lock.release()
    finally:
        async with backend.connection() as connection:
            await connection.execute(backend.sql("DROP SCHEMA {schema} CASCADE"))
        await backend.close()


async def test_migrate_through_pgbouncer_in_transaction_mode_takes_a_direct_dsn(
    private_cluster: PrivateCluster, transaction_bouncer: Bouncer
) -> None:
    schema = unique_schema_name()
    command = [sys.executable, "-m", "eventmill", "migrate", "--schema", schema]
    refused = await asyncio.to_thread(
        subprocess.run,
        [*command, "--dsn", transaction_bouncer.dsn()],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1
    assert len(refused.stderr.strip().splitlines()) == 1 and "--direct-dsn" in refused.stderr
    migrated = await asyncio.to_thread(
        subprocess.run,
        command,
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "EVENTMILL_DSN": transaction_bouncer.dsn(),
            "EVENTMILL_DIRECT_DSN": private_cluster.dsn(),
        },
    )
    assert migrated.returncode == 0, migrated.stderr
    async with await psycopg.AsyncConnection.connect(
        private_cluster.dsn(), autocommit=True
    ) as connection:
        cursor = await connection.execute(
            sql.SQL("SELECT count(*) FROM {}.schema_version").format(sql.Identifier(schema))
        )
        assert (await cursor.fetchone()) != (0,)
        await connection.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


async def test_pgbouncer_in_session_mode_works(session_bouncer: Bouncer) -> None:
    first = await PostgresBackend.connect(
        session_bouncer.dsn(), schema=unique_schema_name(), max_size=3
    )
    second = await PostgresBackend.connect(session_bouncer.dsn(), schema=first.schema)
    try:
        await first.install_schema()
        store = EventStore(first)
        published = await store.stream(category="c", stream="s").publish(events(3))
        assert await EventStore(second).category("c").read() == published
        lock = await first.locks.try_lock("leader")
        assert lock is not None and await lock.confirm()
        assert await second.locks.try_lock("leader") is None  # no split brain
        holder = await second.locks.holder("leader")  # the server's pid, not PgBouncer's
        assert holder is not None and holder.session == lock.backend_pid
        await lock.release()
        again = await second.locks.try_lock("leader")
        assert again is not None
        await again.release()
    finally:
        async with first.connection() as connection:
            await connection.execute(first.sql("DROP SCHEMA {schema} CASCADE"))
        await second.close()
        await first.close()


async def test_an_unsupported_server_version_is_refused_at_connect_and_migrate(
    private_cluster: PrivateCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This machine has PostgreSQL 15 only: the minimum is raised above it instead."""
    async with private_backend(private_cluster.dsn()) as backend:
        monkeypatch.setattr(server_checks, "MINIMUM_SERVER_VERSION", 990000)
        with pytest.raises(StorageError, match=r"^PostgreSQL 15\.\d+ is not supported: "):
            await PostgresBackend.connect(private_cluster.dsn())
        with pytest.raises(StorageError, match="eventmill needs PostgreSQL 99 or newer") as caught:
            await backend.install_schema()
        assert not isinstance(caught.value, SchemaError)


@pytest.mark.parametrize("dsn", [None, 5432, b"host=127.0.0.1"])
async def test_connect_refuses_a_dsn_that_is_not_text(dsn: object) -> None:
    with pytest.raises(InvalidSettingsError, match="dsn must be a connection string"):
        await PostgresBackend.connect(dsn)  # type: ignore[arg-type]


async def test_only_errors_about_eventmills_own_objects_are_schema_errors(
    private_cluster: PrivateCluster,
) -> None:
    async with private_backend(private_cluster.dsn()) as backend:
        with pytest.raises(StorageError) as caught:
            async with backend.connection() as connection:
                await connection.execute("SELECT * FROM not_eventmills_table")
        assert not isinstance(caught.value, SchemaError)
        with pytest.raises(StorageError) as caught:
            async with backend.connection() as connection:
                await connection.execute("SET idle_sessions_timeout = 1")  # unknown setting
        assert not isinstance(caught.value, SchemaError)
        other = PostgresBackend(backend.pool, schema=unique_schema_name())
        with pytest.raises(SchemaError, match="eventmill migrate"):
            await EventStore(other).log().read()


async def test_on_a_standby_log_and_category_reads_refuse_and_stream_reads_work(
    private_cluster: PrivateCluster, standby: PrivateCluster
) -> None:
    async with private_backend(private_cluster.dsn()) as backend:
        published = await EventStore(backend).stream(category="c", stream="s").publish(events(2))
        replica = await PostgresBackend.connect(standby.dsn(), schema=backend.schema)
        try:
            stream = EventStore(replica).stream(category="c", stream="s")

            async def replayed() -> bool:
                try:
                    return len(await stream.read()) == 2
                except SchemaError:  # the schema itself not replayed yet
                    return False

            await wait_until(replayed)
            assert await stream.read() == published
            for handle in (EventStore(replica).log(), EventStore(replica).category("c")):
                with pytest.raises(StorageError, match="standby") as refused:
                    await handle.read()
                assert "target_session_attrs=read-write" in str(refused.value)
                assert "\n" not in str(refused.value)
            assert await replica.events.read_holdback() is None  # cannot be judged there
        finally:
            await replica.close()


async def run_tool(name: str, *arguments: str) -> None:
    """Run one of PostgreSQL's client programs; fail the test with its stderr if it fails."""
    done = await asyncio.to_thread(
        subprocess.run, [str(PG_BIN / name), *arguments], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


BURN_XIDS = (
    "CREATE TEMP TABLE burn (x int);"
    " DO $$ BEGIN FOR i IN 1..5000 LOOP"
    " BEGIN INSERT INTO burn VALUES (i); EXCEPTION WHEN OTHERS THEN NULL; END;"
    " END LOOP; END $$"
)


async def test_events_restored_into_another_cluster_stall_until_migrate_repairs_them(
    private_cluster: PrivateCluster, tmp_path: Path
) -> None:
    """Published on the session's cluster (its xid counter run 5,000 ahead first), dumped
    and restored into a fresh cluster whose counter is far behind."""
    async with private_backend(private_cluster.dsn()) as backend:
        async with await psycopg.AsyncConnection.connect(
            private_cluster.dsn(), autocommit=True
        ) as connection:
            await connection.execute(BURN_XIDS)
        store = EventStore(backend)
        published: list[StoredEvent] = []
        for number in range(6):
            category = "even" if number % 2 == 0 else "odd"
            published += await store.stream(category=category, stream=f"s{number}").publish(
                events(2)
            )
        dump = tmp_path / "events.dump"
        await run_tool(
            "pg_dump", "-Fc", "-n", backend.schema, "-f", str(dump), private_cluster.dsn()
        )
        fresh = await asyncio.to_thread(PrivateCluster.create)
        try:
            await run_tool("pg_restore", "-d", fresh.dsn(), str(dump))
            copy = await PostgresBackend.connect(fresh.dsn(), schema=backend.schema)
            try:
                copied = EventStore(copy)
                new = await copied.stream(category="even", stream="new").publish(events(1))
                # Before the repair reads stop at the first foreign row: nothing is
                # returned, and above all not the new event alone.
                assert await copied.log().read() == []
                assert await copied.category("even").read() == []
                assert await copied.category("odd").read() == []
                command = ["migrate", "--dsn", fresh.dsn(), "--schema", backend.schema]
                migrated = await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-m", "eventmill", *command],
                    capture_output=True,
                    text=True,
                )
                assert migrated.returncode == 0, migrated.stderr
                assert f"restamped {len(published)} events copied" in migrated.stdout
                everything = [e.id for e in published] + [new[0].id]
                assert [e.id for e in await copied.log().read()] == everything
                assert [e.id for e in await copied.category("even").read()] == [
                    e.id for e in published + new if e.category == "even"
                ]
                assert await copy.repair_copied_events() == 0
            finally:
                await copy.close()
        finally:
            await asyncio.to_thread(fresh.remove)


TWO_SUBSCRIBERS = """
from eventmill import CategoryIdentifier, EventProcessingNode

async def ignore(event):
    pass

def make(backend, mode, node_id):
    node = EventProcessingNode(backend, mode=mode, node_id=node_id)
    node.register_subscriber(group="a", source=CategoryIdentifier("x"), processor=ignore)
    node.register_subscriber(group="b", source=CategoryIdentifier("y"), processor=ignore)
    return node
"""


async def test_run_without_the_schema_and_two_subscribers_prints_one_line(
    private_cluster: PrivateCluster, tmp_path: Path
) -> None:
    (tmp_path / "two_subscribers.py").write_text(TWO_SUBSCRIBERS)
    command = ["run", "--dsn", private_cluster.dsn(), "--schema", unique_schema_name()]
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "eventmill",
            *command,
            "--app-dir",
            str(tmp_path),
            "two_subscribers:make",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not installed" in lines[0] and "eventmill migrate" in lines[0]

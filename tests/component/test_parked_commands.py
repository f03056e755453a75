"""``eventmill parked`` on PostgreSQL, in process: list (text and JSON), retry and skip
requests, and one-line errors with their exit codes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from eventmill.backends.base import ParkedRequest, ParkedStream
from eventmill.backends.postgres import PostgresBackend
from eventmill.cli import main
from eventmill.events import CategoryIdentifier, StreamIdentifier
from tests.postgres_support import TEST_DSN, drop_schema, unique_schema_name

pytestmark = pytest.mark.postgres

NOW = datetime(2026, 1, 2, tzinfo=UTC)


async def _install(schema: str) -> None:
    backend = await PostgresBackend.connect(TEST_DSN, schema=schema, max_size=1)
    try:
        await backend.install_schema()
        await backend.parked.park(
            ParkedStream(
                group="totals",
                source=CategoryIdentifier("orders"),
                stream=StreamIdentifier("orders", "o-1"),
                sequence_number=5,
                position=1,
                event_name="order-placed",
                held=2,
                last_held=9,
                error_type="KeyError",
                error_message="'total'\nmore",
                traceback="Traceback ...",
                attempts=3,
                first_failed_at=NOW,
                last_failed_at=NOW,
            )
        )
    finally:
        await backend.close()


async def _requests(schema: str) -> list[tuple[ParkedRequest | None, int | None]]:
    backend = await PostgresBackend.connect(TEST_DSN, schema=schema, max_size=1)
    try:
        return [(r.request, r.skip_through) for r in await backend.parked.list()]
    finally:
        await backend.close()


@pytest.fixture
def schema() -> Iterator[str]:
    name = unique_schema_name()
    asyncio.run(_install(name))
    yield name
    asyncio.run(drop_schema(name))


def test_list_retry_and_skip(schema: str, capsys: pytest.CaptureFixture[str]) -> None:
    where = ["--dsn", TEST_DSN, "--schema", schema]
    assert main(["parked", "list", *where]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("totals") and "orders/o-1" in line
    assert "2 held from sequence number 5 (position 1, order-placed)" in line
    assert "KeyError: 'total' after 3 tries" in line
    assert main(["parked", "list", "--group", "other", "--json", *where]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["parked", "retry", "totals", "orders/o-1", *where]) == 0
    assert "retry of orders/o-1 in group 'totals' requested" in capsys.readouterr().out
    assert asyncio.run(_requests(schema)) == [(ParkedRequest.RETRY, None)]
    assert main(["parked", "skip", "totals", "stream:orders/o-1", "--through", "7", *where]) == 0
    capsys.readouterr()
    assert asyncio.run(_requests(schema)) == [(ParkedRequest.SKIP, 7)]
    assert main(["parked", "list", "--json", *where]) == 0
    [record] = json.loads(capsys.readouterr().out)
    assert (record["request"], record["skip_through"], record["held"]) == ("skip", 7, 2)
    assert record["traceback"] == "Traceback ..."


def test_errors_are_one_line(schema: str, capsys: pytest.CaptureFixture[str]) -> None:
    where = ["--dsn", TEST_DSN, "--schema", schema]
    assert main(["parked", "retry", "totals", "orders/o-2", *where]) == 1
    error = capsys.readouterr().err
    assert error == "eventmill: stream orders/o-2 is not parked in group 'totals'\n"
    with pytest.raises(SystemExit) as exited:
        main(["parked", "skip", "totals", "no-slash", *where])
    assert exited.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_list_shows_an_event_waiting_for_another_try(
    schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(_retrying(schema))
    where = ["--dsn", TEST_DSN, "--schema", schema]
    assert main(["parked", "list", *where]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "retrying sequence number 8 (position 0, order-paid)" in lines[1]
    assert "KeyError: 'total' after 1 tries" in lines[1]
    assert main(["parked", "list", "--json", *where]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [(r["stream"]["stream"], r["retrying"], r["held"]) for r in records] == [
        ("o-1", False, 2),
        ("o-2", True, 0),
    ]


async def _retrying(schema: str) -> None:
    backend = await PostgresBackend.connect(TEST_DSN, schema=schema, max_size=1)
    try:
        [parked] = await backend.parked.list()
        await backend.parked.park(
            replace(
                parked,
                stream=StreamIdentifier("orders", "o-2"),
                sequence_number=8,
                position=0,
                event_name="order-paid",
                held=0,
                last_held=8,
                error_message="'total'",
                attempts=1,
            )
        )
    finally:
        await backend.close()

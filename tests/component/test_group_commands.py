"""``eventmill groups list / retire`` and ``eventmill reset`` through ``cli.main`` (in
process; ``test_cli`` covers the subprocess path) against PostgreSQL: outputs, exit
codes, one-line errors."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import timedelta

import pytest

from eventmill import CategoryPartitionIdentifier
from eventmill.backends.base import Assign
from eventmill.backends.postgres import PostgresBackend
from eventmill.cli import main
from tests.postgres_support import TEST_DSN, drop_schema, unique_schema_name

P0 = CategoryPartitionIdentifier("orders", 0, 2)
P1 = CategoryPartitionIdentifier("orders", 1, 2)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


async def prepare(schema: str) -> None:
    backend = await PostgresBackend.connect(TEST_DSN, schema=schema, max_size=2)
    try:
        await backend.install_schema()
        await backend.subscribers.register("g", "s1", "n1", [P0, P1])
        await backend.subscriptions.apply(
            [Assign(group="g", source=P0, subscriber_id="s1", node_id="n1", epoch=1)]
        )
        await backend.checkpoints.save("g", P0, 5, expected_version=None, epoch=1)
        await backend.checkpoints.save("old", P1, 9, expected_version=None)
    finally:
        await backend.close()


async def age_records(schema: str) -> None:
    backend = await PostgresBackend.connect(TEST_DSN, schema=schema, max_size=1)
    try:
        async with backend.connection() as connection:
            await connection.execute(
                backend.sql("UPDATE {schema}.subscribers SET last_seen = now() - interval '1 hour'")
            )
    finally:
        await backend.close()


@pytest.mark.postgres
def test_list_reset_and_retire(capsys: pytest.CaptureFixture[str]) -> None:
    def eventmill(*arguments: str) -> Result:
        code = main(list(arguments))
        out, err = capsys.readouterr()
        return Result(code, out, err)

    schema = unique_schema_name()
    where = ("--dsn", TEST_DSN, "--schema", schema)
    try:
        asyncio.run(prepare(schema))
        listed = eventmill("groups", "list", *where, "--json")
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == [
            {"group": "g", "subscribers": 1, "live": 1, "holdings": 1, "checkpoints": 1},
            {"group": "old", "subscribers": 0, "live": 0, "holdings": 0, "checkpoints": 1},
        ]
        table = eventmill("groups", "list", *where)
        assert "1 live / 1 subscribers" in table.stdout

        refused = eventmill("groups", "retire", "g", *where)
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines() == [
            "eventmill: group 'g' has 1 live subscribers: stop them first"
        ]

        reset = eventmill(
            "reset", "g", *where, "--to-sequence", "3", "--source", "partition:orders/0of2"
        )
        assert reset.returncode == 0, reset.stderr
        assert reset.stdout.splitlines() == ["g partition:orders/0of2: replays after 3 (epoch 2)"]
        everything = eventmill("reset", "g", *where, "--to-start")
        assert everything.returncode == 0, everything.stderr
        assert len(everything.stdout.splitlines()) == 1
        nothing = eventmill("reset", "nobody", *where, "--to-start")
        assert nothing.returncode == 1 and "nothing reset" in nothing.stdout

        asyncio.run(age_records(schema))
        retired = eventmill("groups", "retire", "g", *where)
        assert retired.returncode == 0, retired.stderr
        assert "1 subscriber records, 1 holdings, 1 checkpoints deleted" in retired.stdout
        left = eventmill("groups", "list", *where, "--json")
        assert [g["group"] for g in json.loads(left.stdout)] == ["old"]
    finally:
        asyncio.run(drop_schema(schema))


@pytest.mark.parametrize(
    "arguments",
    [
        ("reset", "g", "--dsn", TEST_DSN),
        ("reset", "g", "--dsn", TEST_DSN, "--to-start", "--to-sequence", "4"),
        ("reset", "g", "--dsn", TEST_DSN, "--to-sequence", "-1"),
        ("reset", "g", "--dsn", TEST_DSN, "--to-time", "yesterday"),
        ("reset", "g", "--dsn", TEST_DSN, "--to-start", "--source", "partition:x"),
        ("groups", "retire", "--dsn", TEST_DSN),
        ("groups", "--dsn", TEST_DSN),
    ],
)
def test_bad_arguments_are_one_line_with_exit_code_2(
    arguments: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(list(arguments))
    assert exited.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


async def two_versions(schema: str) -> None:
    backend = await PostgresBackend.connect(TEST_DSN, schema=schema, max_size=2)
    try:
        await backend.install_schema()
        await backend.projection_versions.declare("summary", 1)
        assert await backend.projection_versions.cut_over("summary", 1, grace=timedelta(hours=1))
        await backend.projection_versions.declare("summary", 2)
        await backend.checkpoints.save("summary-v2", P0, 3, expected_version=None)
    finally:
        await backend.close()


@pytest.mark.postgres
def test_projections_list_and_retire(capsys: pytest.CaptureFixture[str]) -> None:
    schema = unique_schema_name()
    where = ("--dsn", TEST_DSN, "--schema", schema)
    try:
        asyncio.run(two_versions(schema))
        assert main(["projections", "list", *where, "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [(p["group"], p["state"]) for p in listed] == [
            ("summary-v1", "serving"),
            ("summary-v2", "building"),
        ]
        assert main(["projections", "retire", "summary", "1", *where]) == 1
        assert "not a replaced or building version" in capsys.readouterr().out
        assert main(["projections", "retire", "summary", "2", *where]) == 0
        assert capsys.readouterr().out.strip() == "projection summary v2 retired"
        assert main(["projections", "list", *where]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split(":")[0] for line in lines] == [
            "projection summary v1 (summary-v1)",
            "projection summary v2 (summary-v2)",
        ]
        assert "retired" in lines[1]
        assert main(["groups", "list", *where, "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == []
    finally:
        for name in (f"{schema}__summary", f"{schema}__summary__v1", f"{schema}__summary__v2"):
            asyncio.run(drop_schema(name))
        asyncio.run(drop_schema(schema))

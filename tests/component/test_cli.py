"""The ``eventmill`` command, run for real in a subprocess: the demo checks itself, run
stops gracefully on SIGTERM, migrate and status work, and every error is one line."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.postgres_support import TEST_DSN, connect, drop_schema, unique_schema_name

ROOT = Path(__file__).resolve().parents[2]


def eventmill(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventmill", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_demo_in_memory_checks_its_summary() -> None:
    result = eventmill("demo", "--events", "2000")
    assert result.returncode == 0, result.stderr
    assert "OK: every figure matches" in result.stdout
    assert "order-projection" in result.stdout and "lag" in result.stdout


def test_demo_with_several_nodes_moves_sources() -> None:
    result = eventmill("demo", "--events", "1500", "--nodes", "2")
    assert result.returncode == 0, result.stderr
    assert "its sources move" in result.stdout
    assert "OK: every figure matches" in result.stdout


@pytest.mark.postgres
def test_demo_with_node_processes_moves_sources_and_checks_itself() -> None:
    result = eventmill("demo", "--dsn", TEST_DSN, "--nodes", "3", "--events", "1500")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: every figure matches" in result.stdout
    total = re.search(r"summary: (\d+) events", result.stdout)
    assert total is not None and int(total.group(1)) >= 1500
    assert f"folded in each of the {total.group(1)} events exactly once" in result.stdout
    assert "stopping demo-node-3 gracefully" in result.stdout
    holdings = [
        {node: int(count) for node, count in re.findall(r"(demo-node-\d) (\d+)", line)}
        for line in result.stdout.splitlines()
        if "sources held:" in line
    ]
    assert any(sum(count > 0 for count in held.values()) == 3 for held in holdings)
    assert holdings[-1]["demo-node-3"] == 0 and holdings[-1]["demo-node-4"] > 0
    moves = re.findall(r"demo-node-\d -> (demo-node-\d) x\d+", result.stdout)
    assert "demo-node-4" in moves and len(set(moves)) > 1
    schema = re.search(r"schema (eventmill_demo_\w+)", result.stdout)
    assert schema is not None
    assert not asyncio.run(schema_exists(schema.group(1)))


@pytest.mark.postgres
def test_demo_refuses_an_existing_schema() -> None:
    result = eventmill("demo", "--dsn", TEST_DSN, "--schema", "public", "--events", "10")
    assert result.returncode == 1
    assert result.stderr.strip() == "eventmill: schema 'public' exists: the demo needs a new one"
    assert asyncio.run(schema_exists("public"))


async def schema_exists(name: str) -> bool:
    async with await connect() as connection:
        cursor = await connection.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (name,)
        )
        row = await cursor.fetchone()
    return row is not None and row[0] == 1


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ((), "required"),
        (("demo", "--events", "0"), "at least 1"),
        (("demo", "--events", "many"), "not a number"),
        (("demo", "--schema", "x"), "--schema needs --dsn"),
        (("demo", "--dsn", "postgresql://postgres@127.0.0.1:1/none", "--nodes", "9"), "at most 8"),
        (("run", "nowhere_module:make"), "cannot import"),
        (("run", "eventmill.cli"), "MODULE:ATTRIBUTE"),
        (("run", "eventmill.cli:nothing"), "no attribute"),
        (("run", "eventmill.cli:EXIT_USAGE"), "not callable"),
        (("run", "eventmill.cli:parser"), "failed: TypeError"),
        (("run", "tests.component.cli_app:not_a_node"), "not an EventProcessingNode"),
        (("run", "x:y", "--mode", "king"), "not one of"),
        (("status",), "--dsn"),
        (("migrate", "--dsn", "postgresql://postgres@127.0.0.1:1/none"), "cannot connect"),
        (("status", "--dsn", "postgresql://postgres@127.0.0.1:1/none"), "cannot connect"),
    ],
)
def test_errors_are_one_line_and_a_non_zero_exit(arguments: tuple[str, ...], fragment: str) -> None:
    result = eventmill(*arguments)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eventmill: "), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.postgres
def test_status_on_a_missing_schema_is_one_line() -> None:
    result = eventmill("status", "--dsn", TEST_DSN, "--schema", unique_schema_name())
    assert result.returncode == 2
    assert "not installed" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.postgres
def test_migrate_then_status_then_run_stops_on_sigterm() -> None:
    schema = unique_schema_name()
    try:
        first = eventmill("migrate", "--dsn", TEST_DSN, "--schema", schema)
        assert first.returncode == 0, first.stderr
        assert "applied migrations" in first.stdout
        again = eventmill("migrate", "--dsn", TEST_DSN, "--schema", schema)
        assert again.returncode == 0 and "up to date" in again.stdout
        empty = eventmill("status", "--dsn", TEST_DSN, "--schema", schema, "--json")
        assert empty.returncode == 0, empty.stderr
        assert json.loads(empty.stdout)["sources"] == []
        table = eventmill("status", "--dsn", TEST_DSN, "--schema", schema)
        assert table.returncode == 0 and "0 nodes" in table.stdout

        node = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "eventmill",
                "run",
                "tests.component.cli_app:make_node",
                "--node-id",
                "solo",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert node.stdout is not None
        assert "running" in node.stdout.readline()
        node.send_signal(signal.SIGTERM)
        stdout, stderr = node.communicate(timeout=30)
        assert node.returncode == 0, stderr
        assert "node solo stopped" in stdout
    finally:
        asyncio.run(drop_schema(schema))

"""``eventmill`` configuration: options from ``EVENTMILL_*`` variables, help on every
option, ``--version``, the factory imported from the current directory, the in-memory
notice, ``application_name`` on every connection, the schema check at start, and a
reader that closes stdout early."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from eventmill.cli import EXIT_BROKEN_PIPE, main, parser
from tests.postgres_support import TEST_DSN, connect, drop_schema, unique_schema_name

ROOT = Path(__file__).resolve().parents[2]
EVENTMILL = str(Path(sys.executable).with_name("eventmill"))

FACTORY = """
from eventmill.events import CategoryIdentifier
from eventmill.node import EventProcessingNode


async def ignore(event):
    pass


def make_node(backend, *, mode, node_id):
    node = EventProcessingNode(backend, mode=mode, node_id=node_id)
    node.register_subscriber(group="g", source=CategoryIdentifier("c"), processor=ignore)
    return node
"""


def test_every_option_has_help_text() -> None:
    main_parser = parser()
    commands = next(
        action for action in main_parser._actions if isinstance(action, argparse._SubParsersAction)
    )
    seen = 0
    for command_parser in [main_parser, *commands.choices.values()]:
        for action in command_parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{command_parser.prog} {action.option_strings or action.dest}"
            seen += 1
    assert seen > 15


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith("eventmill 0.")


def test_options_come_from_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTMILL_DSN", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("EVENTMILL_POOL_SIZE", "3")
    monkeypatch.setenv("EVENTMILL_MODE", "observer")
    arguments = parser().parse_args(["run", "m:f"])
    assert arguments.dsn == "postgresql://nobody@127.0.0.1:1/none"
    assert arguments.pool_size == 3 and arguments.mode.name == "OBSERVER"
    assert parser().parse_args(["run", "m:f", "--pool-size", "5"]).pool_size == 5
    monkeypatch.setenv("EVENTMILL_POOL_SIZE", "none")
    with pytest.raises(SystemExit) as exit:
        parser()
    assert exit.value.code == 2


@pytest.mark.postgres
def test_status_takes_the_dsn_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = unique_schema_name()
    monkeypatch.setenv("EVENTMILL_DSN", TEST_DSN)
    monkeypatch.setenv("EVENTMILL_SCHEMA", schema)
    try:
        assert main(["migrate"]) == 0
        assert main(["status"]) == 0
        assert "0 nodes" in capsys.readouterr().out
    finally:
        asyncio.run(drop_schema(schema))


def test_run_imports_from_the_current_directory_and_says_it_runs_in_memory(
    tmp_path: Path,
) -> None:
    (tmp_path / "myapp.py").write_text(FACTORY)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EVENTMILL_")}
    node = subprocess.Popen(
        [EVENTMILL, "run", "myapp:make_node", "--node-id", "here"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    try:
        assert node.stdout is not None
        first = node.stdout.readline()
        assert "node here (BOTH) running in memory" in first, node.stderr
        assert "EVENTMILL_DSN" in first
    finally:
        node.send_signal(signal.SIGTERM)
        _, stderr = node.communicate(timeout=30)
    assert node.returncode == 0, stderr


@pytest.mark.postgres
def test_a_node_sets_application_name_and_refuses_a_missing_schema(tmp_path: Path) -> None:
    (tmp_path / "myapp.py").write_text(FACTORY)
    schema = unique_schema_name()
    command = [EVENTMILL, "run", "myapp:make_node", "--node-id", "named-node", "--schema", schema]
    environment = {**os.environ, "EVENTMILL_DSN": TEST_DSN}
    missing = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, env=environment, timeout=60
    )
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    assert "not installed: run `eventmill migrate`" in missing.stderr
    try:
        assert main(["migrate", "--dsn", TEST_DSN, "--schema", schema]) == 0
        node = subprocess.Popen(
            command,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        try:
            assert node.stdout is not None
            assert "running on schema" in node.stdout.readline()
            names = asyncio.run(application_names())
            assert "eventmill:named-node" in names
        finally:
            node.send_signal(signal.SIGTERM)
            _, stderr = node.communicate(timeout=30)
        assert node.returncode == 0, stderr
    finally:
        asyncio.run(drop_schema(schema))


async def application_names() -> list[str]:
    async with await connect() as connection:
        cursor = await connection.execute(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
        )
        return [name for (name,) in await cursor.fetchall()]


@pytest.mark.postgres
def test_a_closed_stdout_ends_status_without_a_traceback() -> None:
    schema = unique_schema_name()
    try:
        assert main(["migrate", "--dsn", TEST_DSN, "--schema", schema]) == 0
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before anything is written
        try:
            finished = subprocess.run(
                [EVENTMILL, "status", "--dsn", TEST_DSN, "--schema", schema],
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
            )
        finally:
            os.close(write_end)
        assert finished.returncode == EXIT_BROKEN_PIPE
        assert finished.stderr == ""
    finally:
        asyncio.run(drop_schema(schema))


@pytest.mark.postgres
async def test_a_node_refuses_a_schema_lacking_a_migration() -> None:
    from eventmill.errors import SchemaError
    from eventmill.node import EventProcessingNode
    from tests.postgres_support import fresh_postgres_backend

    async with fresh_postgres_backend() as backend:
        async with backend.connection() as connection:
            await connection.execute(
                backend.sql(
                    "DELETE FROM {schema}.schema_version"
                    " WHERE version = (SELECT max(version) FROM {schema}.schema_version)"
                )
            )
        node = EventProcessingNode(backend, node_id="behind")
        with pytest.raises(SchemaError, match=r"lacks migration \d+: run `eventmill migrate`"):
            await node.run()

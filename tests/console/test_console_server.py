"""The console's server on PostgreSQL, over real HTTP: actions only with the operator
token (POST, JSON, same origin, confirmed), nothing changed otherwise; ten open pages
share one read per refresh."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import httpx
import pytest

from eventmill.backends.base import Backend
from eventmill.backends.postgres import PostgresBackend
from eventmill.console import ConsoleApp
from eventmill.console.actions import ConsoleAction
from eventmill.events import CategoryIdentifier
from tests.console.harness import ROOT, free_port, serve, wait_for
from tests.postgres_support import TEST_DSN, fresh_postgres_backend

pytestmark = pytest.mark.postgres

TOKEN = "an-operator-token-for-tests"
SOURCE = CategoryIdentifier("orders")


async def forget_checkpoint(backend: Backend, arguments: Mapping[str, str]) -> str:
    await backend.checkpoints.reset(arguments["group"], SOURCE)
    return f"checkpoint of {arguments['group']} reset"


ACTIONS = {"forget": ConsoleAction(name="forget", fields=("group",), run=forget_checkpoint)}


async def checkpoint_version(backend: PostgresBackend) -> int:
    checkpoint = await backend.checkpoints.get("totals", SOURCE)
    assert checkpoint is not None
    return checkpoint.version


async def test_actions_need_the_token_and_change_nothing_without_it() -> None:
    async with fresh_postgres_backend() as backend:
        await backend.checkpoints.save("totals", SOURCE, 41, expected_version=None)
        app = ConsoleApp(backend, token=TOKEN, actions=ACTIONS)
        read_only = ConsoleApp(backend, actions=ACTIONS)
        async with (
            serve(app) as url,
            serve(read_only) as read_only_url,
            httpx.AsyncClient() as http,
        ):
            good = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
            body = json.dumps({"group": "totals", "confirmed": True})
            refused: list[tuple[str, dict[str, str], str]] = [
                (url, {"content-type": "application/json"}, body),
                (url, {**good, "authorization": "Bearer not-the-operator-token"}, body),
                (url, {**good, "authorization": TOKEN}, body),
                (url, {**good, "origin": "http://evil.example"}, body),
                (url, {**good, "content-type": "application/x-www-form-urlencoded"}, body),
                (read_only_url, good, body),
            ]
            for base, headers, content in refused:
                answer = await http.post(
                    f"{base}api/actions/forget", headers=headers, content=content
                )
                assert answer.status_code == 403, (headers, answer.text)
                assert await checkpoint_version(backend) == 1
            assert (await http.get(f"{url}api/actions/forget", headers=good)).status_code == 405
            unconfirmed = json.dumps({"group": "totals"})
            answer = await http.post(f"{url}api/actions/forget", headers=good, content=unconfirmed)
            assert answer.status_code == 400
            answer = await http.post(f"{url}api/actions/missing", headers=good, content=body)
            assert answer.status_code == 404
            assert await checkpoint_version(backend) == 1

            answer = await http.post(
                f"{url}api/actions/forget",
                headers={**good, "origin": url.rstrip("/")},
                content=body,
            )
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"done": "checkpoint of totals reset"}
            assert await checkpoint_version(backend) == 2


async def read_states(http: httpx.AsyncClient, url: str, into: list[dict[str, Any]]) -> None:
    """Append every ``state`` event of the page's stream to ``into``."""
    async with http.stream("GET", f"{url}api/events") as response:
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "state":
                into.append(json.loads(line.removeprefix("data: ")))


async def test_ten_pages_share_one_read_per_refresh() -> None:
    async with fresh_postgres_backend() as backend:
        # The reading task reads once at start, then not for an hour: every other read
        # is one refresh() below.
        app = ConsoleApp(backend, interval=timedelta(hours=1))
        pages: list[list[dict[str, Any]]] = [[] for _ in range(10)]
        async with serve(app) as url, httpx.AsyncClient(timeout=30) as http:
            readers = [asyncio.ensure_future(read_states(http, url, page)) for page in pages]
            try:

                async def every_page_has(count: int) -> bool:
                    return all(len(page) >= count for page in pages)

                await wait_for(lambda: every_page_has(1), 30, "the first read on every page")
                for count in range(2, 6):
                    await app.refresher.refresh()
                    await wait_for(lambda: every_page_has(count), 30, f"read {count} everywhere")  # noqa: B023
            finally:
                for reader in readers:
                    reader.cancel()
                await asyncio.wait(readers)
        assert app.refresher.reads == 5
        first = [state["read_at"] for state in pages[0]]
        assert len(first) == 5
        assert all([state["read_at"] for state in page] == first for page in pages)


async def test_the_console_command_serves_until_sigterm() -> None:
    async with fresh_postgres_backend() as backend:
        port = free_port()
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "eventmill", "console", "--dsn", TEST_DSN),
            *("--schema", backend.schema, "--port", str(port)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            url = f"http://127.0.0.1:{port}/"
            assert line.decode().strip() == (
                f"console of schema {backend.schema!r} on {url} (read-only)"
            )
            async with httpx.AsyncClient(timeout=10) as http:

                async def serving() -> bool:
                    try:
                        return (await http.get(f"{url}api/state")).status_code == 200
                    except httpx.TransportError:
                        return False

                await wait_for(serving, 30, "the console to answer")
                state = (await http.get(f"{url}api/state")).json()
                assert state["nodes"] == [] and state["groups"] == []
                assert state["warnings"] == [
                    "no coordinator alive: nobody holds the coordinator lock"
                ]
                page = await http.get(url)
                assert page.status_code == 200 and "eventmill console" in page.text
                refused = await http.post(f"{url}api/actions/retry", json={"confirmed": True})
                assert refused.status_code == 403
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 30) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

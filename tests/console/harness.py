"""The console's test harness: the console served by uvicorn on a free loopback port in
the test's event loop, node processes started with ``eventmill run``, and headless
Chromium (the system's, driven by Playwright)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import uvicorn
from playwright.async_api import Browser, async_playwright

from eventmill.console import ConsoleApp
from tests.postgres_support import TEST_DSN

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("EVENTMILL_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(
    os.environ.get("EVENTMILL_SCREENSHOTS", Path(tempfile.gettempdir()) / "eventmill-console")
)
"""Where the browser tests save their screenshots (not committed)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@asynccontextmanager
async def serve(app: ConsoleApp) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port until the block ends; yield its URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.ensure_future(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        await app.close()
        async with asyncio.timeout(10):
            await task


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """The system's headless Chromium (``.ci/ensure-chromium`` installs it)."""
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"no Chromium at {CHROMIUM}: run `bash .ci/ensure-chromium` (as root)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            yield browser
        finally:
            await browser.close()


class NodeProcesses:
    """``eventmill run tests.console.console_nodes:make_node`` processes, by node id
    (each names its connections ``eventmill:<node id>``, which the console reads)."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, node_id: str) -> None:
        self.processes[node_id] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "eventmill",
                "run",
                "tests.console.console_nodes:make_node",
                "--dsn",
                TEST_DSN,
                "--schema",
                self.schema,
                "--node-id",
                node_id,
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill(self, node_id: str) -> None:
        process = self.processes.pop(node_id)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def kill_all(self) -> None:
        """SIGKILL the nodes still running (a test's end: nothing to stop gracefully)."""
        for node_id in list(self.processes):
            self.kill(node_id)


async def wait_for(condition: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Await ``condition()`` until true, at most ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            while not await condition():  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")

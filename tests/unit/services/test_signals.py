"""A child process running a ServiceManager with stop_on() exits 0 on SIGTERM / SIGINT,
after every service, in every isolation mode, saw its cancellation."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest

from eventmill.services import IsolationMode

CHILD = Path(__file__).with_name("signalled_manager.py")
MODES = [mode.name for mode in IsolationMode]


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_stops_the_child_cleanly(signal_number: signal.Signals) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CHILD),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30):
            assert process.stdout is not None
            started: set[str] = set()
            while started != {f"started {mode}" for mode in MODES}:
                line = await process.stdout.readline()
                assert line, "the child ended before its services started"
                started.add(line.decode().strip())
            process.send_signal(signal_number)
            rest, errors = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, errors.decode()
    output = rest.decode().splitlines()
    assert sorted(output[:-1]) == sorted(f"cancelled {mode}" for mode in MODES), output
    assert output[-1] == "stopped"

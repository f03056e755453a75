"""``eventmill`` CLI processes for component tests: ``start_eventmill("run",
"tests.component.operations_app:make_node", "--node-id", "n1")`` runs ``python -m
eventmill ...`` from the repository root, unbuffered, with text pipes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def start_eventmill(
    *arguments: str,
    env: Mapping[str, str] | None = None,
    stdout: int = subprocess.PIPE,
) -> subprocess.Popen[str]:
    """Start ``python -m eventmill *arguments`` (``env`` added to this process's
    environment); stderr is a pipe, stdout one unless ``stdout`` says otherwise. The
    caller reads the pipes and waits for the process."""
    return subprocess.Popen(
        [sys.executable, "-m", "eventmill", *arguments],
        cwd=ROOT,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )

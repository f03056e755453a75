"""The eventmill pytest plugin, loaded by pytest through the ``pytest11`` entry point.

It adds the option ``--eventmill-dsn`` and, when pytest-asyncio is installed (the
``testing`` extra: ``pip install 'eventmill[testing]'``), the fixtures of
``eventmill.testing.fixtures``: ``eventmill_memory_backend``,
``eventmill_postgres_backend`` and ``eventmill_node``. Without pytest-asyncio it adds
no fixture, so projects that do not test with eventmill are not disturbed.
"""

from __future__ import annotations

import importlib.util

import pytest

from eventmill.testing.fixtures import DSN_VARIABLE

if importlib.util.find_spec("pytest_asyncio") is not None:
    from eventmill.testing.fixtures import (
        eventmill_memory_backend,
        eventmill_node,
        eventmill_postgres_backend,
    )

    __all__ = ["eventmill_memory_backend", "eventmill_node", "eventmill_postgres_backend"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("eventmill").addoption(
        "--eventmill-dsn",
        default=None,
        help=f"PostgreSQL DSN for eventmill_postgres_backend (default: ${DSN_VARIABLE})",
    )

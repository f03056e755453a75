"""The pytest plugin as a user meets it: a project of its own (``pytester``) whose tests
use the fixtures and strategies without importing them; the PostgreSQL fixture skips
without a DSN and drops its schema after the test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.postgres_support import TEST_DSN, connect

pytest_plugins = ["pytester"]

INI = "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    """The README's example test (the python block after the marker line)."""
    text = README.read_text()
    marker = text.index("<!-- plugin example -->")
    match = re.search(r"```python\n(.*?)```", text[marker:], re.DOTALL)
    assert match is not None
    return match.group(1)


def run(pytester: pytest.Pytester, *arguments: str) -> pytest.RunResult:
    pytester.makeini(INI)
    # The machine is shared and loaded: data generation may be slow, which is no failure.
    # 20 examples show the strategy works through the plugin; its range is the fuzz
    # suite's job.
    pytester.makeconftest(
        "from hypothesis import HealthCheck, settings\n"
        "settings.register_profile(\n"
        "    'shared', suppress_health_check=[HealthCheck.too_slow], max_examples=20\n"
        ")\n"
        "settings.load_profile('shared')\n"
    )
    pytester.makepyfile(test_orders=readme_example())
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *arguments)


SCHEMA_TEST = """
async def test_schema(eventmill_postgres_backend):
    print("SCHEMA", eventmill_postgres_backend.schema)
    await eventmill_postgres_backend.install_schema()
"""


@pytest.mark.postgres
async def test_the_readme_example_passes_and_schemas_are_dropped(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_schema=SCHEMA_TEST)
    result = run(pytester, "-s", f"--eventmill-dsn={TEST_DSN}")
    result.assert_outcomes(passed=5)
    (schema,) = re.findall(r"SCHEMA (eventmill_test_[0-9a-f]+)", result.stdout.str())
    async with await connect() as connection:
        cursor = await connection.execute(
            "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)
        )
        assert await cursor.fetchone() is None


async def test_without_a_dsn_the_postgres_test_is_skipped(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EVENTMILL_TEST_DSN", raising=False)
    result = run(pytester, "-rs", "-k", "test_on_postgres")
    result.assert_outcomes(skipped=1, deselected=3)
    result.stdout.fnmatch_lines(["*no PostgreSQL: pass --eventmill-dsn or set EVENTMILL_TEST_DSN*"])

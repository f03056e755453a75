"""The distribution: the wheel holds the library, its licence and typing marker but not
the test harness; its long description reads on an index page (no links into the
repository, no contributors' commands) and it names no project URL; ``__version__``
comes from the metadata; a missing extra says what to install in one line."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib.metadata import version
from pathlib import Path

import pytest

import eventmill

ROOT = Path(__file__).resolve().parents[2]


def checkout_entries() -> set[str]:
    return {path.name for path in ROOT.iterdir()} | {path.name for path in (ROOT / "src").iterdir()}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel built from this checkout (no build isolation: hatchling is a dev tool).
    The build writes nothing into the checkout (no build/, no egg-info)."""
    out = tmp_path_factory.mktemp("wheel")
    before = checkout_entries()
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"),
            *("--no-build-isolation", "--wheel-dir", str(out), str(ROOT)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert checkout_entries() == before
    (built,) = out.glob("eventmill-*.whl")
    return zipfile.ZipFile(built)


def test_wheel_holds_the_library_licence_and_data(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    dist_info = f"eventmill-{version('eventmill')}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names
    assert "eventmill/py.typed" in names
    assert "eventmill/backends/postgres/migrations/0001_events.sql" in names
    assert {f"eventmill/console/static/{name}" for name in ("index.html", "console.js")} <= names
    assert not [name for name in names if not name.startswith(("eventmill/", dist_info))]
    assert not [name for name in names if "/testing/faults" in name or "node_process" in name]


def test_wheel_metadata(wheel: zipfile.ZipFile) -> None:
    dist_info = f"eventmill-{version('eventmill')}.dist-info"
    metadata = Parser().parsestr(wheel.read(f"{dist_info}/METADATA").decode())
    assert metadata["License-Expression"] == "MIT"
    classifiers = metadata.get_all("Classifier") or []
    assert "Framework :: AsyncIO" in classifiers and "Typing :: Typed" in classifiers
    assert metadata.get_all("Project-URL") is None  # no public repository to point at
    assert metadata["Keywords"]
    # Dev tools live in a dependency group, not in a published extra.
    assert set(metadata.get_all("Provides-Extra") or []) == {
        "postgres",
        "uvloop",
        "console",
        "metrics",
        "http",
        "otel",
        "testing",
    }


def test_long_description_has_no_links_into_the_repository(wheel: zipfile.ZipFile) -> None:
    dist_info = f"eventmill-{version('eventmill')}.dist-info"
    metadata = Parser().parsestr(wheel.read(f"{dist_info}/METADATA").decode())
    assert metadata["Description-Content-Type"] == "text/markdown"
    description = metadata.get_payload()
    assert isinstance(description, str)
    readme = (ROOT / "README.md").read_text()
    assert readme.count("](docs/") > 10  # what the description must turn into text
    relative = re.findall(r"\]\((?![a-z][a-z0-9+.-]*:|#)[^)]*\)", description)
    assert relative == []
    assert description.startswith("# eventmill\n\neventmill is an asyncio event store")
    assert "make demo" not in description.split("## Install")[0]
    assert "Guarantees (docs/guarantees.md): ordering" in description
    assert "pip install 'eventmill[postgres]'" in description


def test_version_comes_from_the_metadata() -> None:
    assert eventmill.__version__ == version("eventmill")


def test_missing_postgres_extra_is_one_line_naming_the_install() -> None:
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from eventmill.cli import main\n"
        "sys.exit(main(['migrate', '--dsn', 'postgresql://127.0.0.1/none']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 1
    assert result.stderr == (
        "eventmill: the PostgreSQL backend needs psycopg: pip install 'eventmill[postgres]'\n"
    )

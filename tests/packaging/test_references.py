"""Docstrings and comments in the library cite only files that are in the repository
(no outside design document)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITED_FILE = re.compile(r"\b((?:docs|tests|benchmarks)/[\w./-]+\.(?:md|py))")


def test_the_library_cites_only_files_of_the_repository() -> None:
    missing = []
    for source in sorted((ROOT / "src").rglob("*.py")):
        text = source.read_text()
        assert "DESIGN" not in text, f"{source} cites a document outside the repository"
        missing += [
            f"{source.relative_to(ROOT)}: {cited}"
            for cited in CITED_FILE.findall(text)
            if not (ROOT / cited).exists()
        ]
    assert missing == []

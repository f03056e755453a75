"""Type-strict comparison of JSON values (``1 == 1.0 == True`` in Python, not here)."""

from __future__ import annotations

from typing import Any


def canonical(value: Any) -> Any:
    """A form of ``value`` whose equality also compares types and ignores key order."""
    if isinstance(value, dict):
        return ("dict", sorted((key, canonical(item)) for key, item in value.items()))
    if isinstance(value, list):
        return ("list", [canonical(item) for item in value])
    return (type(value).__name__, value)

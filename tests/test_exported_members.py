"""The curated public API: ``__all__`` is sorted, complete and importable."""

from __future__ import annotations

import types

import eventmill


def test_all_is_sorted_and_unique() -> None:
    assert eventmill.__all__ == sorted(set(eventmill.__all__))


def test_every_exported_name_exists() -> None:
    missing = [name for name in eventmill.__all__ if not hasattr(eventmill, name)]
    assert missing == []


def test_every_public_attribute_is_exported() -> None:
    public = {
        name
        for name, value in vars(eventmill).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(eventmill.__all__)

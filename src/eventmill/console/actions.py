"""Operator actions the console offers, each through the same Python API as the CLI.

An action names the fields it takes (strings from the page's form) and runs against
the backend, returning one line saying what it did; it raises EventmillError (shown to
the operator) when refused. ``available_actions`` lists those this installation has.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from eventmill.backends.base import Backend


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsoleAction:
    """One action: ``fields`` it takes and ``run(backend, arguments)``."""

    name: str
    fields: tuple[str, ...]
    run: Callable[[Backend, Mapping[str, str]], Awaitable[str]]


def available_actions() -> dict[str, ConsoleAction]:
    """The actions by name."""
    return {}

"""Operator actions the console offers, each through the same Python API as the CLI.

An action names the fields it takes (strings from the page's form) and runs against
the backend, returning one line saying what it did; it raises EventmillError (shown to
the operator) when refused. ``available_actions`` lists those this installation has.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from eventmill.backends.base import Backend
from eventmill.consumers.failures import retry_parked, skip_parked
from eventmill.events import StreamIdentifier
from eventmill.groups import reset_group, retire_group


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsoleAction:
    """One action: ``fields`` it takes and ``run(backend, arguments)``."""

    name: str
    fields: tuple[str, ...]
    run: Callable[[Backend, Mapping[str, str]], Awaitable[str]]


async def _reset(backend: Backend, arguments: Mapping[str, str]) -> str:
    checkpoints = await reset_group(backend, arguments["group"], to_start=True)
    return f"group {arguments['group']}: {len(checkpoints)} sources replay from the start"


async def _retire(backend: Backend, arguments: Mapping[str, str]) -> str:
    retired = await retire_group(backend, arguments["group"])
    return (
        f"group {retired.group} retired: {retired.holdings} holdings and "
        f"{retired.checkpoints} checkpoints deleted"
    )


async def _retry(backend: Backend, arguments: Mapping[str, str]) -> str:
    stream = StreamIdentifier(arguments["category"], arguments["stream"])
    await retry_parked(backend, arguments["group"], stream)
    return f"{stream} of group {arguments['group']}: retry requested from its holder"


async def _skip(backend: Backend, arguments: Mapping[str, str]) -> str:
    stream = StreamIdentifier(arguments["category"], arguments["stream"])
    await skip_parked(backend, arguments["group"], stream)
    return f"{stream} of group {arguments['group']}: skip of its held events requested"


def available_actions() -> dict[str, ConsoleAction]:
    """The actions by name: ``reset`` (a group, live, to the start: ``reset_group``),
    ``retire`` (a group no live node registers: ``retire_group``), ``retry`` and
    ``skip`` (a parked stream's held events, carried out by its holder at its next
    pass: ``retry_parked``, ``skip_parked``)."""
    stream_fields = ("group", "category", "stream")
    actions = [
        ConsoleAction(name="reset", fields=("group",), run=_reset),
        ConsoleAction(name="retire", fields=("group",), run=_retire),
        ConsoleAction(name="retry", fields=stream_fields, run=_retry),
        ConsoleAction(name="skip", fields=stream_fields, run=_skip),
    ]
    return {action.name: action for action in actions}

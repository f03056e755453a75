"""The ``eventmill groups`` and ``eventmill reset`` commands (see ``eventmill.groups``).

- ``eventmill groups list --dsn DSN [--json]``: every group with its subscriber records
  (live ones), holdings and checkpoints;
- ``eventmill groups retire GROUP --dsn DSN``: delete what is left of a group no node
  registers any more; exit 1 (nothing deleted) while a live node registers it;
- ``eventmill projections list --dsn DSN [--json]``: every version of every versioned
  projection, its state and build progress; ``eventmill projections retire NAME VERSION
  --dsn DSN``: drop a replaced (or building) version now; exit 1 if it is not one;
- ``eventmill reset GROUP --dsn DSN (--to-start | --to-sequence N | --to-time T)
  [--source S ...]``: replay the group live on the running nodes. ``S`` is a source as
  ``eventmill status`` prints it (``log``, ``category:C``, ``stream:C/S``,
  ``partition:C/IofN``) or its JSON form; ``T`` an ISO 8601 time (UTC if no offset).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from eventmill.backends.base import Backend
from eventmill.events import (
    CategoryIdentifier,
    CategoryPartitionIdentifier,
    EventSourceIdentifier,
    LogIdentifier,
    StreamIdentifier,
    identifier_from_json,
)
from eventmill.groups import list_groups, reset_group, retire_group
from eventmill.rebuilds import print_projections, projection_status, retire_version

COMMANDS = ("groups", "reset", "projections")
"""The top-level commands this module adds."""

_PARTITION = re.compile(r"^partition:(.+)/(\d+)of(\d+)$")


def parse_source(text: str) -> EventSourceIdentifier:
    """The identifier written as ``eventmill status`` prints it, or as JSON. Raises
    argparse.ArgumentTypeError."""
    try:
        if text.startswith("{"):
            return identifier_from_json(json.loads(text))
        if text == "log":
            return LogIdentifier()
        kind, _, rest = text.partition(":")
        match = _PARTITION.match(text)
        if match:
            category, partition, partitions = match.groups()
            return CategoryPartitionIdentifier(category, int(partition), int(partitions))
        if kind == "category" and rest:
            return CategoryIdentifier(rest)
        category, _, stream = rest.partition("/")
        if kind == "stream" and category and stream:
            return StreamIdentifier(category, stream)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"bad source {text!r}: {error}") from None
    raise argparse.ArgumentTypeError(
        f"bad source {text!r}: expected log, category:C, stream:C/S, partition:C/IofN or JSON"
    )


def _time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def parse_sequence(text: str) -> int:
    """A sequence number (an int of at least 0); raises argparse.ArgumentTypeError."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0: {value}")
    return value


def add_parsers(
    commands: Any, connection_options: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add ``groups`` and ``reset`` to the subcommands ``commands``;
    ``connection_options(parser)`` adds ``--dsn`` and ``--schema``."""
    groups = commands.add_parser("groups", help="list or retire subscriber groups")
    actions = groups.add_subparsers(dest="action", required=True)
    for action, text in (
        ("list", "every group and what is stored of it"),
        ("retire", "delete a group no live node registers"),
    ):
        sub = actions.add_parser(action, help=text)
        if action == "retire":
            sub.add_argument("group", help="the subscriber group")
        connection_options(sub)
        if action == "list":
            sub.add_argument("--json", action="store_true", help="print JSON")
    projections = commands.add_parser("projections", help="versions of versioned projections")
    verbs = projections.add_subparsers(dest="action", required=True)
    listing = verbs.add_parser("list", help="every version, its state and progress")
    connection_options(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")
    retiring = verbs.add_parser("retire", help="drop a replaced or building version now")
    retiring.add_argument("name")
    retiring.add_argument("version", type=parse_sequence)
    connection_options(retiring)
    reset = commands.add_parser("reset", help="replay a group live on the running nodes")
    reset.add_argument("group", help="the subscriber group")
    connection_options(reset)
    where = reset.add_mutually_exclusive_group(required=True)
    where.add_argument("--to-start", action="store_true", help="replay every event")
    where.add_argument("--to-sequence", type=parse_sequence, metavar="N", help="replay after N")
    where.add_argument("--to-time", type=_time, metavar="T", help="replay from time T")
    reset.add_argument(
        "--source", type=parse_source, action="append", metavar="S", help="only this source"
    )


async def run(
    arguments: argparse.Namespace, dsn: str, connect: Callable[[str, str], Awaitable[Backend]]
) -> int:
    """Run a ``groups`` or ``reset`` command line on ``dsn``; return the exit code.
    Raises EventmillError (GroupInUseError when retiring a group in use)."""
    backend = await connect(dsn, arguments.schema)
    try:
        if arguments.command == "reset":
            moved = await reset_group(
                backend,
                arguments.group,
                to_start=arguments.to_start,
                to_sequence=arguments.to_sequence,
                to_time=arguments.to_time,
                sources=arguments.source,
            )
            if not moved:
                print(f"group {arguments.group!r} has no sources: nothing reset")
                return 1
            for checkpoint in moved:
                print(
                    f"{checkpoint.group} {checkpoint.source!s}: replays after "
                    f"{checkpoint.after} (epoch {checkpoint.epoch})"
                )
            return 0
        if arguments.command == "projections":
            return await _projections(backend, arguments)
        if arguments.action == "retire":
            gone = await retire_group(backend, arguments.group)
            print(
                f"group {gone.group!r} retired: {gone.subscribers} subscriber records, "
                f"{gone.holdings} holdings, {gone.checkpoints} checkpoints deleted"
            )
            return 0
        summaries = await list_groups(backend)
    finally:
        await backend.close()
    if arguments.json:
        print(json.dumps([summary_json(s) for s in summaries], indent=2))
    for summary in [] if arguments.json else summaries:
        print(
            f"{summary.group:<32} {summary.live} live / {summary.subscribers} subscribers, "
            f"{summary.holdings} holdings, {summary.checkpoints} checkpoints"
        )
    return 0


async def _projections(backend: Backend, arguments: argparse.Namespace) -> int:
    if arguments.action == "list":
        found = await projection_status(backend)
        if arguments.json:
            print(json.dumps(found, indent=2))
        else:
            print_projections(found)
        return 0
    if await retire_version(backend, arguments.name, arguments.version):
        print(f"projection {arguments.name} v{arguments.version} retired")
        return 0
    print(f"projection {arguments.name} v{arguments.version} is not a replaced or building version")
    return 1


def summary_json(summary: Any) -> dict[str, Any]:
    """A GroupSummary as JSON."""
    return {
        "group": summary.group,
        "subscribers": summary.subscribers,
        "live": summary.live,
        "holdings": summary.holdings,
        "checkpoints": summary.checkpoints,
    }

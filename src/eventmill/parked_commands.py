"""The ``eventmill parked`` commands (see ``eventmill.consumers.failures``).

- ``eventmill parked list --dsn DSN [--group G] [--json]``: every parked stream with
  its first held event, the count of held events, the error and the tries, and every
  event that failed and waits for another try ("retrying", JSON ``"retrying": true``);
- ``eventmill parked retry GROUP STREAM --dsn DSN``: ask the holder of the stream's
  source to replay its held events in order through the code it runs now;
- ``eventmill parked skip GROUP STREAM --dsn DSN [--through SEQ]``: ask the holder to
  record the held events up to sequence number SEQ (all without ``--through``) as
  skipped and to replay the rest.

``STREAM`` is ``CATEGORY/STREAM`` (or ``stream:CATEGORY/STREAM`` as ``eventmill
status`` prints it). Requests are carried out by the running node that holds the
source, at its next pass; ``parked list`` shows a pending request. Exit codes: 0 done,
1 failed (e.g. the stream is not parked in that group), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from typing import Any

from eventmill.backends.base import Backend, ParkedStream
from eventmill.consumers.failures import parked_streams, retry_parked, skip_parked
from eventmill.errors import InvalidIdentifierError
from eventmill.events import StreamIdentifier
from eventmill.group_commands import parse_sequence

COMMANDS = ("parked",)
"""The top-level commands this module adds."""


def parse_stream(text: str) -> StreamIdentifier:
    """``CATEGORY/STREAM`` or ``stream:CATEGORY/STREAM``; raises ArgumentTypeError."""
    body = text.removeprefix("stream:")
    category, _, stream = body.partition("/")
    try:
        return StreamIdentifier(category, stream)
    except InvalidIdentifierError as error:
        raise argparse.ArgumentTypeError(
            f"bad stream {text!r}: expected CATEGORY/STREAM ({error})"
        ) from None


def add_parsers(
    commands: Any, connection_options: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add ``parked`` to the subcommands ``commands``; ``connection_options(parser)``
    adds ``--dsn`` and ``--schema``."""
    parked = commands.add_parser(
        "parked",
        help="list, retry or skip streams held back after a processor failed",
        description="Streams a group holds back after its processor failed on one of "
        "their events. Exit codes: 0 done, 1 failed, 2 bad arguments.",
    )
    actions = parked.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="every parked stream")
    connection_options(listing)
    listing.add_argument("--group", help="only this group")
    listing.add_argument("--json", action="store_true", help="print JSON")
    for action, text in (
        ("retry", "replay the held events in order through the running code"),
        ("skip", "record held events as skipped, replay the rest"),
    ):
        sub = actions.add_parser(action, help=text)
        sub.add_argument("group")
        sub.add_argument("stream", type=parse_stream, metavar="CATEGORY/STREAM")
        connection_options(sub)
        if action == "skip":
            sub.add_argument(
                "--through",
                type=parse_sequence,
                metavar="SEQ",
                help="skip held events up to this sequence number (default: all)",
            )


async def run(
    arguments: argparse.Namespace, dsn: str, connect: Callable[[str, str], Awaitable[Backend]]
) -> int:
    """Run a ``parked`` command line on ``dsn``; return the exit code. Raises
    EventmillError (InvalidInputError when the stream is not parked in the group)."""
    backend = await connect(dsn, arguments.schema)
    try:
        if arguments.action == "list":
            records = await parked_streams(backend, group=arguments.group)
        elif arguments.action == "retry":
            marked = await retry_parked(backend, arguments.group, arguments.stream)
        else:
            marked = await skip_parked(
                backend, arguments.group, arguments.stream, through=arguments.through
            )
    finally:
        await backend.close()
    if arguments.action != "list":
        stream = arguments.stream
        what = "retry" if arguments.action == "retry" else "skip"
        print(
            f"{what} of {stream.category}/{stream.stream} in group {arguments.group!r} "
            f"requested ({marked} source{'s' if marked != 1 else ''}); its holder carries it "
            "out at its next pass"
        )
        return 0
    if arguments.json:
        print(json.dumps([parked_json(r) for r in records], indent=2))
        return 0
    if not records:
        print("nothing is parked")
    for record in records:
        request = "" if record.request is None else f", {record.request.value} requested"
        message = record.error_message.splitlines()[0] if record.error_message else ""
        stream = f"{record.stream.category}/{record.stream.stream}"
        state = "retrying" if record.retrying else f"{record.held} held from"
        print(
            f"{record.group:<24} {stream:<32} "
            f"in {record.source!s}: {state} sequence number "
            f"{record.sequence_number} (position {record.position}, {record.event_name}); "
            f"{record.error_type}: {message} "
            f"after {record.attempts} tries{request}"
        )
    return 0


def parked_json(record: ParkedStream) -> dict[str, Any]:
    """A ParkedStream as JSON."""
    return {
        "group": record.group,
        "source": record.source.to_json(),
        "stream": {"category": record.stream.category, "stream": record.stream.stream},
        "sequence_number": record.sequence_number,
        "position": record.position,
        "event_name": record.event_name,
        "held": record.held,
        "retrying": record.retrying,
        "error_type": record.error_type,
        "error_message": record.error_message,
        "traceback": record.traceback,
        "attempts": record.attempts,
        "first_failed_at": record.first_failed_at.isoformat(),
        "last_failed_at": record.last_failed_at.isoformat(),
        "request": None if record.request is None else record.request.value,
        "skip_through": record.skip_through,
    }

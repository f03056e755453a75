"""Failure policy: what a consumer does when its processor raises on an event.

An event whose processing raises is tried again, up to ``max_attempts`` tries in all,
after a capped exponential backoff with jitter; while it waits, only its source
waits (the consumer's passes over that source return at once; other sources and
groups go on). Then the policy's ``then`` action applies:

- ``PARK`` (the default): the stream is parked. A durable record (``ParkedStream``)
  names the event and the error; that event and every later event of the same stream
  are held, in order, while the rest of the source flows on; the checkpoint moves past
  held events, which stay in the store. The record belongs to the (group, source), so
  whichever node holds the source next keeps holding the stream.
- ``SKIP``: the event is recorded as skipped (``SkippedEvent``) and processing goes on.
- ``STOP_GROUP``: the subscriber stops processing (status ERRORED) and keeps its
  sources, so they do not move to another node to fail there too; the node runs on.
- ``STOP_NODE``: ``ProcessorFailedError`` is raised out of the pass, which stops the
  node (unless its error handler says otherwise).

Storage failures (``StorageError``, ``ConflictError``) are not processor failures:
they leave the pass as before, for the node's error handler to retry.

Operators resolve parked streams with ``retry_parked`` (replay the held events in
order through the current code) or ``skip_parked`` (record held events as skipped,
replay the rest); the holder of the source carries the request out at its next pass.
With a ``TransactionalEventProcessor`` every step (processing an event, parking,
skipping, holding, replaying) commits together with the checkpoint or the parked
record's progress, so each event is applied exactly once.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from eventmill.backends.base import Backend, ParkedRequest, ParkedStream
from eventmill.errors import InvalidInputError, InvalidSettingsError, describe
from eventmill.events import EventSourceIdentifier, StoredEvent, StreamIdentifier, check_name
from eventmill.services.error_handlers import ExponentialBackoff, RetryBackoff


class FailureAction(enum.Enum):
    """What happens to an event once its tries are used up."""

    PARK = "park"
    """Hold the event and the rest of its stream (ordered parking)."""
    SKIP = "skip"
    """Record the event as skipped and go on."""
    STOP_GROUP = "stop-group"
    """Stop the subscriber (its group on this node); the node keeps running."""
    STOP_NODE = "stop-node"
    """Raise ProcessorFailedError out of the pass, which stops the node."""


def _default_backoff() -> RetryBackoff:
    return ExponentialBackoff(
        initial=timedelta(milliseconds=500), maximum=timedelta(seconds=30), jitter=0.2
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class FailurePolicy:
    """Per-event retries, then an action (see the module docstring).

    ``max_attempts``: tries of an event in all (1 to 1,000; 1: no retry). ``backoff``:
    the wait after failure number n (default: 0.5 s doubling up to 30 s, 20 % jitter).
    ``then``: the action after the last try. ``clock``: monotonic seconds, injected in
    tests.
    """

    max_attempts: int = 3
    backoff: RetryBackoff = field(default_factory=_default_backoff)
    then: FailureAction = FailureAction.PARK
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if type(self.max_attempts) is not int or not 1 <= self.max_attempts <= 1000:
            raise InvalidSettingsError(
                f"max_attempts must be an int from 1 to 1000, not {describe(self.max_attempts)}"
            )
        if not isinstance(self.backoff, RetryBackoff):
            raise InvalidSettingsError(f"backoff must be a RetryBackoff, not {self.backoff!r:.80}")
        if not isinstance(self.then, FailureAction):
            raise InvalidSettingsError(f"then must be a FailureAction, not {self.then!r:.80}")
        if not callable(self.clock):
            raise InvalidSettingsError(f"clock must be callable, not {self.clock!r:.80}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failure number ``attempt`` (finite, >= 0)."""
        seconds = self.backoff.delay(attempt).total_seconds()
        return seconds if math.isfinite(seconds) and seconds > 0 else 0.0


def check_failure_policy(value: object) -> FailurePolicy:
    """``value`` if it is a FailurePolicy; raise InvalidSettingsError."""
    if not isinstance(value, FailurePolicy):
        raise InvalidSettingsError(f"failure_policy must be a FailurePolicy, not {value!r:.80}")
    return value


def where(group: str, source: EventSourceIdentifier, event: StoredEvent) -> str:
    """The one-line description of an event that every failure message starts with."""
    return (
        f"group {group}, source {source}, stream {event.category}/{event.stream}, "
        f"position {event.position}, sequence number {event.sequence_number}, "
        f"event {event.name}"
    )


def one_line(error: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, at most ``limit`` characters."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- operations ---------------------------------------------------------------------


async def parked_streams(backend: Backend, *, group: str | None = None) -> list[ParkedStream]:
    """Every parked stream (of ``group``), by group, source and stream. Raises
    StorageError."""
    if group is not None:
        check_name(group, "group")
    return await backend.parked.list(group=group)


async def retry_parked(backend: Backend, group: str, stream: StreamIdentifier) -> int:
    """Ask the holder of each source of ``group`` that parked ``stream`` to replay the
    held events in order through its processor (at its next pass); return how many
    records were marked. The stream flows again once every held event succeeded; a
    failure applies the group's policy again. Raises InvalidInputError when the stream
    is not parked in the group, StorageError."""
    return await _request(backend, group, stream, ParkedRequest.RETRY, None)


async def skip_parked(
    backend: Backend, group: str, stream: StreamIdentifier, *, through: int | None = None
) -> int:
    """Ask the holder to record the held events of ``stream`` up to sequence number
    ``through`` (all of them when None) as skipped and to replay the rest in order;
    return how many records were marked. Raises InvalidInputError when the stream is
    not parked in the group or ``through`` is no sequence number, StorageError."""
    if through is not None and (type(through) is not int or through < 0):
        raise InvalidInputError(f"through must be a sequence number, not {describe(through)}")
    return await _request(backend, group, stream, ParkedRequest.SKIP, through)


async def _request(
    backend: Backend,
    group: str,
    stream: StreamIdentifier,
    request: ParkedRequest,
    through: int | None,
) -> int:
    check_name(group, "group")
    if not isinstance(stream, StreamIdentifier):
        raise InvalidInputError(f"stream must be a StreamIdentifier, not {stream!r:.80}")
    marked = await backend.parked.request(group, stream, request, skip_through=through)
    if marked == 0:
        raise InvalidInputError(
            f"stream {stream.category}/{stream.stream} is not parked in group {group!r}"
        )
    return marked

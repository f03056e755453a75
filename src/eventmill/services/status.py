"""Process status: what a long-running component reports, and how several combine."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Protocol, runtime_checkable


class ProcessStatus(StrEnum):
    """Where a long-running component is in its life."""

    INITIALISED = "initialised"
    """Created, not started."""
    STARTING = "starting"
    """Started, not yet doing its work."""
    WAITING = "waiting"
    """Running and idle: waiting for work or for its next turn."""
    RUNNING = "running"
    """Running and busy."""
    DEGRADED = "degraded"
    """Running, but some work is held back (a parked stream, an event being retried)."""
    STOPPING = "stopping"
    """Asked to stop, or partly stopped; not yet finished."""
    STOPPED = "stopped"
    """Finished, normally or by cancellation."""
    ERRORED = "errored"
    """Ended by an exception."""
    UNKNOWN = "unknown"
    """Cannot be told (for example, a component that does not report)."""


@runtime_checkable
class Process(Protocol):
    """Anything long-running that reports its status."""

    @property
    def status(self) -> ProcessStatus:
        """The current status; reading it never blocks."""
        ...


def combine_statuses(statuses: Iterable[ProcessStatus]) -> ProcessStatus:
    """The status of a whole made of components with these ``statuses``.

    The result depends only on which statuses occur (not how often, nor in which
    order), so combining is commutative, associative and idempotent and wholes nest.
    The first rule that applies wins:

    ======================================================  ===========
    statuses present                                        result
    ======================================================  ===========
    none at all                                             STOPPED
    any ERRORED                                             ERRORED
    any UNKNOWN                                             UNKNOWN
    any STOPPING                                            STOPPING
    STOPPED together with anything but STOPPED              STOPPING
    only STOPPED                                            STOPPED
    any STARTING                                            STARTING
    INITIALISED together with WAITING or RUNNING            STARTING
    only INITIALISED                                        INITIALISED
    any DEGRADED (the rest WAITING or RUNNING)              DEGRADED
    any RUNNING (the rest WAITING)                          RUNNING
    only WAITING                                            WAITING
    ======================================================  ===========

    In words: one failure makes the whole failed; a whole that is partly stopped is
    stopping; a whole that is partly started is starting; a whole with held-back work is
    degraded; it is waiting only when every part is waiting.
    """
    present = set(statuses)
    if not present:
        return ProcessStatus.STOPPED
    for dominant in (ProcessStatus.ERRORED, ProcessStatus.UNKNOWN, ProcessStatus.STOPPING):
        if dominant in present:
            return dominant
    if ProcessStatus.STOPPED in present:
        return ProcessStatus.STOPPED if len(present) == 1 else ProcessStatus.STOPPING
    if ProcessStatus.STARTING in present:
        return ProcessStatus.STARTING
    if ProcessStatus.INITIALISED in present:
        return ProcessStatus.INITIALISED if len(present) == 1 else ProcessStatus.STARTING
    if ProcessStatus.DEGRADED in present:
        return ProcessStatus.DEGRADED
    if ProcessStatus.RUNNING in present:
        return ProcessStatus.RUNNING
    return ProcessStatus.WAITING

"""OwnershipLease: how long this node may go on processing the sources it holds.

The coordinator declares a subscriber dead, and gives its sources away, once the
database clock says its last heartbeat is older than the subscriber max age. A
heartbeat statement sent at (monotonic) time ``t`` is recorded at ``t`` or later, so
nobody can be given this node's sources before ``t + max_age``. The lease therefore
lets a subscriber process while ``time.monotonic() - t < max_age - margin``, where
``t`` is when the latest *successful* heartbeat was sent. ``CLOCK_MONOTONIC`` keeps
running while a process is paused (SIGSTOP, a VM or GC pause), so a woken process
finds its lease expired before it touches the next event.

The margin (``lease_margin``) is half the gap between the heartbeat interval and the
max age: the lease lasts ``(heartbeat_interval + max_age) / 2`` (3 s with the default
1 s and 5 s). The other half of the gap is the slack a healthy node has for a late
heartbeat before it pauses itself. The margin is the time an event (or transactional
batch) begun just before expiry has to finish before the source can possibly move,
so single events should take less than that. A consumer's exactly-once transactions
are bounded by it (``CheckpointStorage.transaction(bound=...)``): on PostgreSQL the
server ends a transaction idle, or a statement running, for longer than the margin, so
a holder frozen or cut off inside its batch releases its checkpoint row in time for
the source to move.

A lease that lapsed (expired before it was renewed, even if nobody looked) also waits
for a ``confirmed`` call: the observer reports each successful round, and only one
that started after the renewal proves this node's holdings are up to date again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

from eventmill.errors import InvalidSettingsError


def lease_margin(heartbeat_interval: timedelta, max_age: timedelta) -> timedelta:
    """The margin a lease keeps below ``max_age``: half of ``max_age -
    heartbeat_interval``. Raises InvalidSettingsError unless ``max_age`` is longer."""
    if max_age <= heartbeat_interval:
        raise InvalidSettingsError("the subscriber max age must exceed the heartbeat interval")
    return (max_age - heartbeat_interval) / 2


class OwnershipLease:
    """Valid for ``duration`` after the latest successful heartbeat was sent, and, after
    a lapse, only once an observer round that started after the renewal succeeded.

    Starts expired (no heartbeat yet). ``clock`` (default ``time.monotonic``) is for
    tests. Never blocks; safe to read from another thread's loop.
    """

    def __init__(
        self,
        duration: timedelta,
        *,
        margin: timedelta | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(duration, timedelta) or duration <= timedelta(0):
            raise InvalidSettingsError(f"a lease duration must be positive, not {duration!r}")
        if margin is not None and (not isinstance(margin, timedelta) or margin <= timedelta(0)):
            raise InvalidSettingsError(f"a lease margin must be positive, not {margin!r}")
        self.duration = duration
        self.margin = margin
        """How long work begun while the lease is valid may take before the source can
        move (None: unknown); exactly-once transactions are bounded by it."""
        self._seconds = duration.total_seconds()
        self._clock = clock
        self._sent_at: float | None = None
        self._confirm_after: float | None = None

    def renewed(self, sent_at: float) -> None:
        """Record a heartbeat that succeeded, sent at ``sent_at`` (clock time). If the
        lease had lapsed before it, the lease stays invalid until ``confirmed`` (the
        first heartbeat needs no confirmation: nothing was held before it)."""
        previous = self._sent_at
        if previous is not None and sent_at <= previous:
            return
        if previous is not None and sent_at - previous >= self._seconds:
            self._confirm_after = self._clock()
        self._sent_at = sent_at

    def confirmed(self, round_started_at: float) -> None:
        """Record an observer round that started at ``round_started_at`` (clock time)
        and succeeded: it ends the wait after a lapse if it started after the renewal."""
        after = self._confirm_after
        if after is not None and round_started_at >= after:
            self._confirm_after = None

    def is_valid(self) -> bool:
        """Whether a subscriber may process an event now."""
        sent_at = self._sent_at
        return (
            sent_at is not None
            and self._confirm_after is None
            and self._clock() - sent_at < self._seconds
        )

    def __repr__(self) -> str:
        return f"<OwnershipLease {self.duration} {'valid' if self.is_valid() else 'expired'}>"

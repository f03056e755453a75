"""Versioned projections: blue/green rebuilds with an automatic cutover.

::

    node.register_projection(
        name="order-summary", version=2, source=CategoryIdentifier("orders"),
        processor=OrderSummaryV2(version_schema(backend, "order-summary", 2)),
        setup=create_tables, partitions=8,
    )

A version is a subscriber group of its own (``order-summary-v2``, ``versioned_group``)
that builds its own tables (on PostgreSQL: in ``version_schema``, see
``backends/postgres/projection_versions.py``) from the start of its source, while the
version serving until now keeps serving through the read alias (PostgreSQL: the views
of ``alias_schema``). A ``ProjectionKeeper`` runs next to each version's subscriber on
every node that registers it; every ``check_interval``, and while its version builds
also each time the version's subscriber ends a pass that processed events (it read to
the end of its sources, so the cutover may be due), it:

1. reports the build's progress every PROGRESS_EVERY seconds (``behind``: the events
   left after its checkpoints, counted by ``EventStorage.lags``; the ETA from how fast
   that shrinks), shown by ``eventmill status``;
2. once the building version is at most ``cutover_lag`` behind, cuts over: in one
   transaction the alias switches to it and the old version becomes RETIRING;
3. stops its own subscriber when its version was replaced (RETIRING or RETIRED), so
   nodes still running an old version stop processing it;
4. retires every RETIRING version of the projection whose grace period is over and
   whose group no live node registers: the group's checkpoints, holdings and records
   (``GroupStorage.retire``), then its tables. ``retire_version`` (``eventmill
   projections retire NAME VERSION``) does it at once.

Side effects: a rebuild is a new group that only builds tables, so reactors (groups
that send mails, call services...) are never run again by it. Keep side effects out
of versioned projections, in reactor groups of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from eventmill.backends.base import (
    Backend,
    ConsumerTransaction,
    LagPlace,
    ProjectionVersion,
    VersionState,
)
from eventmill.errors import EventmillError, GroupInUseError, InvalidSettingsError, describe
from eventmill.events import EventSourceIdentifier
from eventmill.groups import IN_USE_MAX_AGE
from eventmill.sources import EventSource
from eventmill.store import MAX_PAGE_SIZE

logger = logging.getLogger(__name__)

PROGRESS_EVERY = 5.0
"""Seconds between two counts of the events a building version has left (a count
reads the index of every such event; the cutover check reads at most ``cutover_lag``)."""

Setup = Callable[[ConsumerTransaction], Awaitable[None]]
"""Creates a version's tables (idempotently: ``CREATE TABLE IF NOT EXISTS``)."""

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


def check_projection(name: object, version: object) -> tuple[str, int]:
    """``(name, version)`` if ``name`` is 1 to 40 of ``[a-z0-9_-]`` starting with a
    letter and ``version`` an int >= 1; raise InvalidSettingsError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidSettingsError(
            f"a versioned projection's name is 1 to 40 of a-z, 0-9, _ and -, starting with a "
            f"letter, not {describe(name)}"
        )
    if type(version) is not int or version < 1:
        raise InvalidSettingsError(f"version must be an int >= 1, not {describe(version)}")
    return name, version


def versioned_group(name: str, version: int) -> str:
    """The subscriber group that builds ``version`` of the projection ``name``."""
    return f"{name}-v{version}"


class ProjectionKeeper:
    """The upkeep of one version of a projection on one node (see the module docstring).

    ``sources`` are the group's requests. Construction does no I/O.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        name: str,
        version: int,
        sources: Sequence[EventSourceIdentifier],
        setup: Setup | None = None,
        cutover_lag: int = 100,
        retire_grace: timedelta = timedelta(minutes=10),
        check_interval: timedelta = timedelta(seconds=1),
    ) -> None:
        self.backend = backend
        self.name, self.version = check_projection(name, version)
        self.group = versioned_group(name, version)
        self.sources = tuple(sources)
        if setup is not None and not callable(setup):
            raise InvalidSettingsError(f"setup must be an async function: {describe(setup)}")
        self.setup = setup
        if type(cutover_lag) is not int or not 0 <= cutover_lag < MAX_PAGE_SIZE:
            raise InvalidSettingsError(
                f"cutover_lag must be an int from 0 to {MAX_PAGE_SIZE - 1}: {describe(cutover_lag)}"
            )
        self.cutover_lag = cutover_lag
        for what, value in (("retire_grace", retire_grace), ("check_interval", check_interval)):
            if not isinstance(value, timedelta) or value < timedelta(0):
                raise InvalidSettingsError(f"{what} must be a timedelta >= 0: {describe(value)}")
        self.retire_grace = retire_grace
        self.check_interval = check_interval
        self._last: tuple[float, int] | None = None  # (monotonic time, events behind)
        self._building = True  # wake() is ignored once the version no longer builds
        self._woken: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    async def prepare(self) -> bool:
        """Declare the version and run ``setup``; False when a newer version already
        serves (then this node must not build it). Raises StorageError."""
        record = await self.backend.projection_versions.declare(self.name, self.version)
        if record.state is not VersionState.BUILDING and record.state is not VersionState.SERVING:
            logger.warning(
                "projection %s: version %d is %s; not building it",
                self.name,
                self.version,
                record.state.value,
            )
            return False
        if self.setup is not None:
            async with self.backend.checkpoints.transaction() as transaction:
                await self.setup(transaction)
        return True

    def wake(self) -> None:
        """Run the next round now rather than after ``check_interval`` while the version
        builds (callable from any thread; ignored before ``run`` and once it serves)."""
        if self._building and self._woken is not None:
            loop, woken = self._woken
            loop.call_soon_threadsafe(woken.set)

    async def run(self) -> None:
        """Keep the version until it is replaced (then return: the caller stops its
        subscriber) or cancelled. A round that fails with an eventmill error (storage
        down, a row locked too long) is logged and the next one tries again."""
        woken = asyncio.Event()
        self._woken = (asyncio.get_running_loop(), woken)
        while True:
            woken.clear()
            try:
                if await self.keep():
                    return
            except EventmillError as error:  # e.g. storage down, a row locked: next round
                logger.warning("projection %s v%d: %s", self.name, self.version, error)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.check_interval.total_seconds()):
                    await woken.wait()

    async def keep(self) -> bool:
        """One round; True when this version was replaced. Raises StorageError."""
        versions = self.backend.projection_versions
        records = {r.version: r for r in await versions.versions(self.name)}
        mine = records.get(self.version)
        if mine is None or mine.state in (VersionState.RETIRING, VersionState.RETIRED):
            logger.info("projection %s: version %d was replaced", self.name, self.version)
            return True
        self._building = mine.state is VersionState.BUILDING
        if self._building:
            if self._last is None or time.monotonic() - self._last[0] >= PROGRESS_EVERY:
                behind, eta = await self.progress()
                await versions.report(self.name, self.version, behind=behind, eta_seconds=eta)
            if await self.caught_up() and await versions.cut_over(
                self.name, self.version, grace=self.retire_grace
            ):
                self._building = False
                logger.info("projection %s: version %d serves now", self.name, self.version)
        for record in records.values():
            if record.state is VersionState.RETIRING and _due(record):
                await self._retire(record.version)
        return False

    async def _retire(self, version: int) -> None:
        try:
            await self.backend.groups.retire(
                versioned_group(self.name, version), max_age=IN_USE_MAX_AGE
            )
        except GroupInUseError:
            return  # a node still runs it; it stops it soon
        if await self.backend.projection_versions.retire(self.name, version):
            logger.info("projection %s: version %d retired", self.name, version)

    async def caught_up(self) -> bool:
        """Whether at most ``cutover_lag`` events are left to build (reads at most that
        many, plus one, per source). Raises StorageError."""
        left = self.cutover_lag
        for source in self.sources:
            checkpoint = await self.backend.checkpoints.get(self.group, source)
            after = None if checkpoint is None else checkpoint.after
            page = await EventSource(self.backend, source).read(after=after, limit=left + 1)
            left -= len(page)
            if left < 0:
                return False
        return True

    async def progress(self) -> tuple[int, float | None]:
        """(how many events are left to build, the ETA in seconds or None while the
        backlog does not shrink). Raises StorageError."""
        places: list[LagPlace] = []
        for source in self.sources:
            checkpoint = await self.backend.checkpoints.get(self.group, source)
            places.append((source, None if checkpoint is None else checkpoint.after, None))
        behind = sum(lag.events for lag in await self.backend.events.lags(places))
        now = time.monotonic()
        eta = None
        if self._last is not None and now > self._last[0] and behind < self._last[1]:
            rate = (self._last[1] - behind) / (now - self._last[0])
            eta = round(behind / rate, 1)
        self._last = (now, behind)
        return behind, eta


def _due(record: ProjectionVersion) -> bool:
    return record.retire_after is not None and record.retire_after <= datetime.now(UTC)


async def retire_version(
    backend: Backend, name: str, version: int, *, max_age: timedelta = IN_USE_MAX_AGE
) -> bool:
    """Retire ``version`` of the projection ``name`` now, without waiting for its grace
    period: delete its group, then drop its tables. Only a RETIRING or BUILDING version
    (never the serving one); False when it is not one. Raises GroupInUseError while a
    node runs it (seen within ``max_age``), StorageError."""
    name, version = check_projection(name, version)
    records = {r.version: r for r in await backend.projection_versions.versions(name)}
    found = records.get(version)
    if found is None or found.state not in (VersionState.RETIRING, VersionState.BUILDING):
        return False
    await backend.groups.retire(versioned_group(name, version), max_age=max_age)
    return await backend.projection_versions.retire(name, version, now=True)


async def projection_status(backend: Backend) -> list[dict[str, Any]]:
    """Every projection version as JSON (for ``eventmill status``)."""
    return [
        {
            "name": record.name,
            "version": record.version,
            "group": versioned_group(record.name, record.version),
            "state": record.state.value,
            "since": record.changed_at.isoformat(),
            "behind": record.behind,
            "eta_seconds": record.eta_seconds,
            "retire_after": None
            if record.retire_after is None
            else record.retire_after.isoformat(),
        }
        for record in await backend.projection_versions.versions()
    ]


def print_projections(projections: list[dict[str, Any]]) -> None:
    """``projection_status`` as lines: one per version."""
    for entry in projections:
        progress = ""
        if entry["state"] == VersionState.BUILDING.value and entry["behind"] is not None:
            eta = entry["eta_seconds"]
            progress = f", {entry['behind']} events behind" + (
                "" if eta is None else f", ETA {eta:.0f} s"
            )
        elif entry["retire_after"] is not None and entry["state"] == "retiring":
            progress = f", dropped after {entry['retire_after']}"
        print(
            f"projection {entry['name']} v{entry['version']} ({entry['group']}): "
            f"{entry['state']} since {entry['since']}{progress}"
        )

"""Projections: fold a source's events into JSON states, kept in a ProjectionStore.

::

    class OrderTotals(Projector):
        name = "order-totals"

        @handles("order-placed")
        def placed(self, state: JsonObject, event: StoredEvent) -> JsonObject:
            return {**state, "total": event.payload["total"], "status": "open"}

    store = ProjectionStore(backend, OrderTotals.name)
    subscriber = make_subscriber(
        backend, group="order-totals", sources=CategoryIdentifier("orders"),
        processor=ProjectionProcessor(OrderTotals(), store),
    )

Handlers are registered explicitly with ``@handles(event_name_or_class, ...)`` (see
``eventmill.handlers``: a handler registered by a typed event class gets the decoded
event); the registry is built and checked when the class is created. Events without a
handler are skipped. By default one state is kept per stream (``projection_id``).

``ProjectionProcessor`` is a transactional processor: on PostgreSQL the states of a
batch and the consumer's checkpoint commit in one transaction, so every event is
folded in exactly once even across crashes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from eventmill.backends.base import (
    Backend,
    ConsumerTransaction,
    Projection,
    ProjectionFilterValue,
)
from eventmill.consumers.processors import TransactionalEventProcessor
from eventmill.errors import InvalidInputError, InvalidSettingsError
from eventmill.events import JsonObject, StoredEvent, check_name, copy_json_object
from eventmill.handlers import Handler, collect_handlers
from eventmill.handlers import handles as handles  # re-exported: the projector API

MAX_FIND_LIMIT = 10_000


class Projector:
    """Folds events into a state; subclasses set ``name`` and mark handlers with
    ``@handles`` (see ``eventmill.handlers``): methods taking ``(self, state, event)``
    and returning the new state. ``handlers`` maps each handled event name to its
    Handler."""

    name: ClassVar[str]
    handlers: ClassVar[Mapping[str, Handler]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.handlers = collect_handlers(cls, cls.handlers, ("state", "event"))
        if "name" in vars(cls):
            check_name(cls.name, "projection name", InvalidSettingsError)

    def handled(self, event: StoredEvent) -> bool:
        """Whether ``event`` has a handler."""
        return event.name in self.handlers

    def projection_id(self, event: StoredEvent) -> str:
        """Which state ``event`` belongs to: by default its stream."""
        return event.stream

    def initial_state(self, projection_id: str) -> JsonObject:
        """The state before the first event of ``projection_id``: by default empty."""
        return {}

    def apply(self, state: JsonObject, event: StoredEvent) -> JsonObject:
        """The state after ``event`` (unchanged when it has no handler). Raises
        EventDecodingError when a typed handler's event cannot be decoded."""
        handler = self.handlers.get(event.name)
        if handler is None:
            return state
        method: Callable[[JsonObject, object], JsonObject] = getattr(self, handler.attribute)
        return method(state, handler.argument(event))


class ProjectionStore:
    """The states of one projection ``name`` in ``backend``. Making one does no I/O."""

    def __init__(self, backend: Backend, name: str) -> None:
        if not isinstance(backend, Backend):
            raise InvalidInputError(f"ProjectionStore needs a Backend, not {backend!r:.80}")
        self.backend = backend
        self.name = check_name(name, "projection name")

    async def get(
        self, id: str, *, transaction: ConsumerTransaction | None = None
    ) -> Projection | None:
        """The state of ``id``, or None. Raises StorageError."""
        return await self.backend.projections.get(
            self.name, check_name(id, "projection id"), transaction=transaction
        )

    async def save(
        self, id: str, state: JsonObject, *, transaction: ConsumerTransaction | None = None
    ) -> Projection:
        """Insert or replace the state of ``id``. Raises InvalidEventError when ``state``
        is not a JSON object, StorageError."""
        return await self.backend.projections.save(
            self.name,
            check_name(id, "projection id"),
            copy_json_object(state, "projection state"),
            transaction=transaction,
        )

    async def delete(self, id: str, *, transaction: ConsumerTransaction | None = None) -> bool:
        """Remove the state of ``id``; True if there was one. Raises StorageError."""
        return await self.backend.projections.delete(
            self.name, check_name(id, "projection id"), transaction=transaction
        )

    async def find(
        self,
        *,
        where: Mapping[str, ProjectionFilterValue] | None = None,
        order_by: str | None = None,
        descending: bool = False,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Projection]:
        """States whose top-level keys equal ``where``'s values (str, int, float, bool or
        None), sorted by the top-level key ``order_by`` (missing or null values last,
        ties by id), ``limit`` of them from ``offset``. Raises InvalidInputError, StorageError."""
        for key, value in (where or {}).items():
            check_name(key, "filter key", InvalidInputError)
            if not isinstance(value, str | int | float | bool | None):
                raise InvalidInputError(f"filter {key!r}: compare with a scalar, not {value!r:.80}")
        if order_by is not None:
            check_name(order_by, "order_by key", InvalidInputError)
        if type(limit) is not int or not 0 <= limit <= MAX_FIND_LIMIT:
            raise InvalidInputError(
                f"limit must be an int from 0 to {MAX_FIND_LIMIT}, not {limit!r}"
            )
        if type(offset) is not int or offset < 0:
            raise InvalidInputError(f"offset must be an int >= 0, not {offset!r}")
        return await self.backend.projections.find(
            self.name,
            where=dict(where or {}),
            order_by=order_by,
            descending=bool(descending),
            limit=limit,
            offset=offset,
        )


class ProjectionProcessor(TransactionalEventProcessor):
    """Keeps ``store`` up to date with ``projector``: per batch, each touched state is
    read once, folded, and saved once, in the batch's checkpoint transaction."""

    def __init__(self, projector: Projector, store: ProjectionStore) -> None:
        if not isinstance(projector, Projector):
            raise InvalidInputError(f"not a Projector: {projector!r:.80}")
        if not isinstance(store, ProjectionStore):
            raise InvalidInputError(f"not a ProjectionStore: {store!r:.80}")
        self.projector = projector
        self.store = store

    async def process_events(
        self, events: Sequence[StoredEvent], transaction: ConsumerTransaction
    ) -> None:
        projector = self.projector
        states: dict[str, JsonObject] = {}
        for event in events:
            if not projector.handled(event):
                continue
            key = projector.projection_id(event)
            state = states.get(key)
            if state is None:
                stored = await self.store.get(key, transaction=transaction)
                state = projector.initial_state(key) if stored is None else stored.state
            states[key] = projector.apply(state, event)
        for key, state in states.items():
            await self.store.save(key, state, transaction=transaction)

"""Handler methods marked with ``@handles``, for projectors and ``HandlerProcessor``.

::

    class Notifier(HandlerProcessor):
        @handles(OrderPlaced)                       # a registered event class
        async def placed(self, event: OrderPlaced) -> None: ...

        @handles("order-cancelled", "order-voided")  # event names
        async def cancelled(self, event: StoredEvent) -> None: ...

A handler registered by class receives the event decoded into that class (see
``eventmill.event_types``; upcast to its version); one registered by name receives the
StoredEvent. The registry of a class is built and checked when the class is created: an
event handled twice in one class, a class that is not a registered event class, or a
handler with the wrong parameters raises InvalidSettingsError there. A subclass inherits
its bases' handlers and may replace them.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from eventmill.consumers.processors import EventProcessor
from eventmill.errors import InvalidSettingsError
from eventmill.event_types import event_type_of
from eventmill.events import StoredEvent, check_name

F = TypeVar("F", bound=Callable[..., Any])

_HANDLES = "__eventmill_handles__"


@dataclasses.dataclass(frozen=True, slots=True)
class Handler:
    """A registered handler: the method's attribute name and, when registered by class,
    the event class its argument is decoded into."""

    attribute: str
    event_class: type | None

    def argument(self, event: StoredEvent) -> object:
        """What the handler is called with: ``event`` decoded, or as it is.
        Raises EventDecodingError."""
        if self.event_class is None:
            return event
        event_type = event_type_of(self.event_class)
        assert event_type is not None
        return event_type.registry.decode_as(event, self.event_class)


def handles(*events: str | type) -> Callable[[F], F]:
    """Register the decorated method as the handler of ``events``: event names, or
    event classes registered with ``EventTypes.event``. Raises InvalidSettingsError."""
    if not events:
        raise InvalidSettingsError("@handles needs at least one event name or class")
    marks: list[tuple[str, type | None]] = []
    for event in events:
        if isinstance(event, type):
            event_type = event_type_of(event)
            if event_type is None:
                raise InvalidSettingsError(
                    f"@handles({event.__qualname__}): not a registered event class"
                )
            marks.append((event_type.name, event))
        else:
            marks.append((check_name(event, "event name", InvalidSettingsError), None))

    def register(function: F) -> F:
        setattr(function, _HANDLES, tuple(marks))
        return function

    return register


def collect_handlers(
    cls: type, inherited: Mapping[str, Handler], parameters: tuple[str, ...]
) -> dict[str, Handler]:
    """The handlers of ``cls``: ``inherited`` updated with the methods ``cls`` marks.
    Each must take ``parameters`` besides ``self``. Raises InvalidSettingsError."""
    own: dict[str, Handler] = {}
    for attribute, value in vars(cls).items():
        marks = getattr(value, _HANDLES, None)
        if marks is None:
            continue
        names = list(inspect.signature(value).parameters)
        if len(names) != len(parameters) + 1:
            raise InvalidSettingsError(
                f"{cls.__name__}.{attribute} must take (self, {', '.join(parameters)}), "
                f"not ({', '.join(names)})"
            )
        for event_name, event_class in marks:
            if event_name in own:
                raise InvalidSettingsError(
                    f"{cls.__name__}: {event_name!r} is handled by both "
                    f"{own[event_name].attribute} and {attribute}"
                )
            own[event_name] = Handler(attribute, event_class)
    return {**inherited, **own}


class HandlerProcessor(EventProcessor):
    """An EventProcessor that calls the ``@handles`` method of each event, which takes
    ``(self, event)``; events without one are skipped. A handler's exception (and an
    EventDecodingError) stops the pass like any processor's."""

    handlers: ClassVar[Mapping[str, Handler]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.handlers = collect_handlers(cls, cls.handlers, ("event",))
        for handler in cls.handlers.values():
            if not inspect.iscoroutinefunction(getattr(cls, handler.attribute)):
                raise InvalidSettingsError(
                    f"{cls.__name__}.{handler.attribute} must be an async def"
                )

    async def process_event(self, event: StoredEvent) -> None:
        handler = self.handlers.get(event.name)
        if handler is not None:
            await getattr(self, handler.attribute)(handler.argument(event))

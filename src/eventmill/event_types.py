"""Typed events: classes registered under a stored name and version, with upcasters.

::

    types = EventTypes()

    @types.event("order-placed", version=2)
    @dataclass(frozen=True)
    class OrderPlaced:
        order_id: UUID
        total: Decimal
        currency: str

    @types.upcaster("order-placed", from_version=1)
    def add_currency(payload: JsonObject) -> JsonObject:
        return {**payload, "currency": "EUR"}

    await store.stream(category="orders", stream="o-1").publish([OrderPlaced(...)])
    placed = types.decode_as(stored_event, OrderPlaced)      # or types.decode(stored)

An event class is a dataclass, or a model with ``to_payload()`` and a class method
``from_payload(payload)`` (pydantic: ``model_dump(mode="json")`` / ``model_validate``;
msgspec: ``msgspec.to_builtins`` / ``msgspec.convert``). Its fields are encoded as in
``eventmill.encoding``. Publishing an instance stores its name, its encoded payload and
its version in the metadata key ``VERSION_KEY``; an event stored without that key (a
plain ``NewEvent``) is version 1.

Reading runs the upcasters from the stored version up to the class's version, one
version at a time, then decodes. ``decode`` raises EventDecodingError, never returns a
guess, when the name is not registered, the stored version is newer than the class, an
upcaster in the chain is missing, or the payload does not fit. ``knows(event)`` tells
beforehand whether an event's name is registered (the fallback: keep the StoredEvent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from eventmill.encoding import Codec, Codecs, decode_dataclass, is_model, to_json
from eventmill.errors import EventDecodingError, InvalidEventError, InvalidSettingsError, describe
from eventmill.events import JsonObject, NewEvent, StoredEvent, check_name

VERSION_KEY = "eventmill.version"
"""The metadata key holding a typed event's version."""

C = TypeVar("C", bound=type)
T = TypeVar("T")
Upcaster = Callable[[JsonObject], JsonObject]
U = TypeVar("U", bound=Upcaster)

_EVENT_TYPE = "__eventmill_event_type__"


@dataclasses.dataclass(frozen=True, slots=True)
class EventType:
    """What a registered class is stored as."""

    name: str
    version: int
    cls: type
    registry: EventTypes


def event_type_of(value: object) -> EventType | None:
    """The EventType of a registered class or of its instance, or None."""
    found = getattr(value if isinstance(value, type) else type(value), _EVENT_TYPE, None)
    return found if isinstance(found, EventType) else None


def stored_version(event: StoredEvent) -> int:
    """The version an event was stored with (1 when it has none)."""
    version = event.metadata.get(VERSION_KEY, 1)
    if type(version) is not int or version < 1:
        raise EventDecodingError(
            f"event {event.id}: metadata {VERSION_KEY} must be an int >= 1, not {version!r}"
        )
    return version


class EventTypes:
    """A registry of event classes and upcasters, with the codecs for extra value types.
    Registering raises InvalidSettingsError for a name or class registered twice, a
    version below 1, or a class that is neither a dataclass nor a model."""

    def __init__(self, *, codecs: Mapping[type, Codec[Any]] | None = None) -> None:
        self.codecs: Codecs = dict(codecs or {})
        self._types: dict[str, EventType] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    def event(self, name: str, *, version: int = 1) -> Callable[[C], C]:
        """Register the decorated class as event ``name`` at ``version``."""
        check_name(name, "event name", InvalidSettingsError)
        if type(version) is not int or version < 1:
            raise InvalidSettingsError(f"version must be an int >= 1, not {describe(version)}")

        def register(cls: C) -> C:
            if not (dataclasses.is_dataclass(cls) or is_model(cls)):
                raise InvalidSettingsError(
                    f"{cls.__name__} must be a dataclass or have to_payload and from_payload"
                )
            if event_type_of(cls) is not None and _EVENT_TYPE in vars(cls):
                raise InvalidSettingsError(f"{cls.__name__} is already registered")
            known = self._types.get(name)
            if known is not None and known.cls.__qualname__ != cls.__qualname__:
                raise InvalidSettingsError(
                    f"event name {name!r} is already registered to {known.cls.__qualname__}"
                )
            event_type = EventType(name, version, cls, self)
            self._types[name] = event_type
            setattr(cls, _EVENT_TYPE, event_type)
            return cls

        return register

    def upcaster(self, name: str, *, from_version: int) -> Callable[[U], U]:
        """Register the decorated function as the step from ``from_version`` to the next
        version of event ``name``: it takes the stored payload and returns the new one."""
        check_name(name, "event name", InvalidSettingsError)
        if type(from_version) is not int or from_version < 1:
            raise InvalidSettingsError(
                f"from_version must be an int >= 1, not {describe(from_version)}"
            )

        def register(function: U) -> U:
            if (name, from_version) in self._upcasters:
                raise InvalidSettingsError(
                    f"{name!r} already has an upcaster from version {from_version}"
                )
            self._upcasters[name, from_version] = function
            return function

        return register

    def knows(self, event: StoredEvent) -> bool:
        """Whether ``event``'s name is registered."""
        return event.name in self._types

    def decode(self, event: StoredEvent) -> object:
        """``event`` as an instance of its registered class, upcast to the class's
        version. Raises EventDecodingError (see the module's docstring)."""
        event_type = self._types.get(event.name)
        if event_type is None:
            raise EventDecodingError(
                f"event {event.id}: no event class is registered for {event.name!r}"
            )
        version = stored_version(event)
        if version > event_type.version:
            raise EventDecodingError(
                f"event {event.id}: {event.name!r} version {version} is newer than "
                f"{event_type.cls.__qualname__} (version {event_type.version})"
            )
        payload = event.payload
        while version < event_type.version:
            step = self._upcasters.get((event.name, version))
            if step is None:
                raise EventDecodingError(
                    f"event {event.id}: no upcaster for {event.name!r} from version {version}"
                )
            payload = step(payload)
            version += 1
        where = f"event {event.id} ({event.name!r} v{event_type.version})"
        if is_model(event_type.cls):
            try:
                return event_type.cls.from_payload(payload)  # type: ignore[attr-defined]
            except Exception as error:  # the model's validation error, whatever its type
                raise EventDecodingError(f"{where}: {error}") from error
        return decode_dataclass(event_type.cls, payload, self.codecs, where)

    def decode_as(self, event: StoredEvent, cls: type[T]) -> T:
        """``decode(event)``, checked to be a ``cls``. Raises EventDecodingError."""
        value = self.decode(event)
        if not isinstance(value, cls):
            raise EventDecodingError(
                f"event {event.id}: {event.name!r} is a {type(value).__qualname__}, "
                f"not a {cls.__qualname__}"
            )
        return value


def encode_event(
    value: object, *, metadata: JsonObject | None = None, occurred_at: datetime | None = None
) -> NewEvent:
    """The NewEvent storing ``value``, an instance of a registered event class: its name,
    encoded payload and version. Raises InvalidEventError when it is not one, when it
    cannot be encoded, or when ``metadata`` already has ``VERSION_KEY``."""
    event_type = event_type_of(value)
    if event_type is None or isinstance(value, type):
        raise InvalidEventError(
            f"publish takes NewEvent or registered event instances, not {describe(value)}"
        )
    payload = to_json(value, event_type.registry.codecs)
    if not isinstance(payload, dict):
        raise InvalidEventError(f"{event_type.cls.__qualname__} must encode to a JSON object")
    metadata = dict(metadata or {})
    if VERSION_KEY in metadata:
        raise InvalidEventError(f"metadata key {VERSION_KEY!r} is reserved for the version")
    metadata[VERSION_KEY] = event_type.version
    if occurred_at is None:
        return NewEvent(name=event_type.name, payload=payload, metadata=metadata)
    return NewEvent(
        name=event_type.name, payload=payload, metadata=metadata, occurred_at=occurred_at
    )

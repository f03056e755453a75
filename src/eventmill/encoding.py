"""Value encoding: Python values to JSON and back, led by type annotations.

``to_json(value)`` turns a value into JSON: ``None``, ``bool``, ``str``, ``int`` and
``float`` stay as they are; and

=================================  ==========================================
value                              JSON
=================================  ==========================================
aware ``datetime``                 ISO 8601 text with its UTC offset, to the µs
``date`` / ``time``                ISO 8601 text
``timedelta``                      an int of microseconds
``Decimal``                        its exact text (``"12.30"``)
``UUID``                           its text
``bytes``                          base64 text
an ``Enum`` member                 its value, encoded
``str``/``int``/``float`` subclass the plain value
``list`` / ``tuple``               a list
``dict`` with ``str`` keys         an object
a dataclass instance               an object of its fields
a model (``to_payload()``)         what ``to_payload`` returns
a type in ``codecs``               what its codec's ``encode`` returns
=================================  ==========================================

``from_json(data, annotation)`` is the reverse, led by the annotation: ``datetime``,
``Decimal``, ``UUID``, enums, ``tuple[int, ...]``, ``list[X]``, ``dict[str, X]``,
``X | None``, ``Literal[...]``, ``NewType``, nested dataclasses and models, ``Any``
(data as is). A naive datetime, a UTC offset with a fraction of a second, a NaN or an
object with a non-``str`` key raises
InvalidEventError when encoding; data that does not fit the annotation raises
EventDecodingError when decoding, naming the place.

Codecs are the hook for other types: ``Codec(encode=..., decode=...)`` in the
``codecs`` mapping of ``EventTypes``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import math
import types
import typing
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Generic, Literal, TypeVar, Union

from eventmill.errors import EventDecodingError, InvalidEventError, describe
from eventmill.events import JsonObject, JsonValue

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class Codec(Generic[T]):
    """How one more type is encoded: ``encode(value)`` returns JSON (it may use any
    value ``to_json`` takes), ``decode(data)`` rebuilds the value."""

    encode: Callable[[T], Any]
    decode: Callable[[JsonValue], T]


Codecs = Mapping[type, Codec[Any]]
_NO_CODECS: Codecs = {}


def is_model(cls: object) -> bool:
    """Whether ``cls`` follows the model protocol: a ``to_payload(self)`` method returning
    a JSON object and a ``from_payload(cls, payload)`` class method (pydantic and msgspec
    models implement them in two lines each)."""
    return callable(getattr(cls, "to_payload", None)) and callable(
        getattr(cls, "from_payload", None)
    )


def to_json(value: object, codecs: Codecs = _NO_CODECS, where: str = "payload") -> JsonValue:
    """``value`` as JSON (see the module's table). Raises InvalidEventError naming the
    place of a value that cannot be encoded."""
    if value is None or value is True or value is False:
        return value
    kind = type(value)
    if kind is str or kind is int:
        return value  # type: ignore[return-value]
    if kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise InvalidEventError(f"{where}: {describe(value)} is not valid JSON")
        return value  # type: ignore[return-value]
    if kind is dict or kind is list or kind is tuple:
        return _container(value, codecs, where)
    codec = codecs.get(kind)
    if codec is not None:
        return to_json(codec.encode(value), codecs, where)
    if isinstance(value, enum.Enum):
        return to_json(value.value, codecs, where)
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidEventError(f"{where}: datetimes must be timezone-aware: {value!r}")
        _check_offset(value.utcoffset(), where)
        return value.isoformat()
    if isinstance(value, time):
        _check_offset(value.utcoffset(), where)
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value // timedelta(microseconds=1)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return to_json(float(value), codecs, where)
    if isinstance(value, Mapping | list | tuple):
        return _container(value, codecs, where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: to_json(getattr(value, field.name), codecs, f"{where}.{field.name}")
            for field in dataclasses.fields(value)
        }
    if is_model(kind):
        return to_json(value.to_payload(), codecs, where)  # type: ignore[attr-defined]
    raise InvalidEventError(
        f"{where}: cannot encode {kind.__name__} (add a Codec for it to EventTypes)"
    )


def _check_offset(offset: timedelta | None, where: str) -> None:
    """Refuse a UTC offset with a fraction of a second (ISO text would drop it)."""
    if offset is not None and offset.microseconds:
        raise InvalidEventError(f"{where}: a UTC offset with a fraction of a second: {offset}")


def _container(value: Any, codecs: Codecs, where: str) -> JsonValue:
    if isinstance(value, Mapping):
        encoded: JsonObject = {}
        for key, item in value.items():
            if isinstance(key, enum.Enum):
                key = key.value
            if not isinstance(key, str):
                raise InvalidEventError(
                    f"{where}: object keys must be str, not {type(key).__name__}"
                )
            encoded[str.__str__(key)] = to_json(item, codecs, f"{where}.{key}")
        return encoded
    return [to_json(item, codecs, f"{where}[{i}]") for i, item in enumerate(value)]


_FIELD_TYPES: dict[type, dict[str, tuple[Any, bool]]] = {}


def field_types(cls: type) -> dict[str, tuple[Any, bool]]:
    """A dataclass's fields: name -> (annotation, whether it has a default); cached."""
    known = _FIELD_TYPES.get(cls)
    if known is not None:
        return known
    hints = typing.get_type_hints(cls)
    known = _FIELD_TYPES[cls] = {
        field.name: (
            hints.get(field.name, Any),
            field.default is not dataclasses.MISSING
            or field.default_factory is not dataclasses.MISSING,
        )
        for field in dataclasses.fields(cls)
        if field.init
    }
    return known


def from_json(
    data: JsonValue, annotation: Any, codecs: Codecs = _NO_CODECS, where: str = "payload"
) -> Any:
    """``data`` decoded as ``annotation``. Raises EventDecodingError naming the place."""
    try:
        return _decode(data, annotation, codecs, where)
    except EventDecodingError:
        raise
    except (ValueError, TypeError, InvalidOperation, binascii.Error) as error:
        raise EventDecodingError(
            f"{where}: cannot read {describe(data, 60)} as {_name(annotation)}: {error}"
        ) from None


def _name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation)


def _fail(data: object, annotation: Any, where: str) -> EventDecodingError:
    return EventDecodingError(f"{where}: expected {_name(annotation)}, found {describe(data, 60)}")


def _decode(data: JsonValue, annotation: Any, codecs: Codecs, where: str) -> Any:
    if annotation is Any or annotation is object or isinstance(annotation, typing.ForwardRef):
        return data
    if annotation is None or annotation is type(None):
        if data is not None:
            raise _fail(data, annotation, where)
        return None
    origin = typing.get_origin(annotation)
    if origin is not None:
        return _decode_generic(data, annotation, origin, codecs, where)
    supertype = getattr(annotation, "__supertype__", None)
    if supertype is not None:  # a NewType
        return _decode(data, supertype, codecs, where)
    if not isinstance(annotation, type):
        return data
    codec = codecs.get(annotation)
    if codec is not None:
        return codec.decode(data)
    if annotation is bool:
        if type(data) is not bool:
            raise _fail(data, annotation, where)
        return data
    if issubclass(annotation, enum.Enum):
        return _enum_member(annotation, data, codecs)
    if issubclass(annotation, datetime):
        value = annotation.fromisoformat(_text(data, annotation, where))
        if value.tzinfo is None:
            raise _fail(data, "a timezone-aware datetime", where)
        return value
    if issubclass(annotation, date | time | Decimal | uuid.UUID):
        text = _text(data, annotation, where)
        if issubclass(annotation, date | time):
            return annotation.fromisoformat(text)
        return annotation(text)
    if issubclass(annotation, timedelta):
        if type(data) is not int:
            raise _fail(data, annotation, where)
        return annotation(microseconds=data)
    if issubclass(annotation, bytes):
        return annotation(base64.b64decode(_text(data, annotation, where), validate=True))
    if issubclass(annotation, str):
        return annotation(_text(data, annotation, where))
    if issubclass(annotation, int):
        if type(data) is not int:
            raise _fail(data, annotation, where)
        return annotation(data)
    if issubclass(annotation, float):
        if type(data) is not float and type(data) is not int:
            raise _fail(data, annotation, where)
        return annotation(data)
    if dataclasses.is_dataclass(annotation):
        return decode_dataclass(annotation, data, codecs, where)
    if is_model(annotation):
        if not isinstance(data, dict):
            raise _fail(data, annotation, where)
        return annotation.from_payload(data)  # type: ignore[attr-defined]
    if issubclass(annotation, dict | list | tuple):
        return _decode_generic(data, annotation, annotation, codecs, where)
    raise EventDecodingError(f"{where}: cannot decode into {_name(annotation)}")


def _enum_member(cls: type[enum.Enum], data: JsonValue, codecs: Codecs) -> enum.Enum:
    """The member whose value encodes to ``data`` (a tuple value is stored as a list)."""
    try:
        return cls(data)
    except ValueError:
        for member in cls:
            if to_json(member.value, codecs) == data:
                return member
        raise


def _text(data: JsonValue, annotation: Any, where: str) -> str:
    if type(data) is not str:
        raise _fail(data, annotation, where)
    return data


def _decode_generic(
    data: JsonValue, annotation: Any, origin: Any, codecs: Codecs, where: str
) -> Any:
    arguments = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _decode(data, arguments[0], codecs, where)
    if origin is Union or origin is types.UnionType:
        if data is None and type(None) in arguments:
            return None
        errors = []
        for member in arguments:
            if member is type(None):
                continue
            try:
                return from_json(data, member, codecs, where)
            except EventDecodingError as error:
                errors.append(str(error))
        raise EventDecodingError("; ".join(errors))
    if origin is Literal:
        if data not in arguments:
            raise _fail(data, annotation, where)
        return data
    if isinstance(origin, type) and issubclass(origin, Mapping):
        if not isinstance(data, dict):
            raise _fail(data, annotation, where)
        key_type, value_type = arguments or (str, Any)
        return {
            _decode(key, key_type, codecs, where): _decode(
                value, value_type, codecs, f"{where}.{key}"
            )
            for key, value in data.items()
        }
    if isinstance(origin, type) and issubclass(origin, Sequence):
        if not isinstance(data, list):
            raise _fail(data, annotation, where)
        if origin is tuple and arguments and (len(arguments) != 2 or arguments[1] is not ...):
            if len(arguments) != len(data):
                raise _fail(data, annotation, where)
            return tuple(
                _decode(item, kind, codecs, f"{where}[{i}]")
                for i, (item, kind) in enumerate(zip(data, arguments, strict=True))
            )
        item_type = arguments[0] if arguments else Any
        items = [_decode(item, item_type, codecs, f"{where}[{i}]") for i, item in enumerate(data)]
        return tuple(items) if origin is tuple else items
    raise EventDecodingError(f"{where}: cannot decode into {annotation}")


def decode_dataclass(cls: type[Any], data: JsonValue, codecs: Codecs, where: str) -> Any:
    """An instance of the dataclass ``cls`` from a JSON object of its fields. Raises
    EventDecodingError for a missing required field, an unknown key or a value that does
    not fit."""
    if not isinstance(data, dict):
        raise _fail(data, cls, where)
    fields = field_types(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise EventDecodingError(f"{where}: {cls.__name__} has no field {', '.join(unknown)}")
    missing = [name for name, (_, has_default) in fields.items() if not has_default]
    missing = [name for name in missing if name not in data]
    if missing:
        raise EventDecodingError(f"{where}: {cls.__name__} needs {', '.join(missing)}")
    values = {
        name: from_json(data[name], fields[name][0], codecs, f"{where}.{name}") for name in data
    }
    return cls(**values)

"""Logging set-up for processes that run eventmill (``eventmill run`` uses it).

``configure_logging(level, format)`` gives the root logger one handler on stderr whose
lines carry the time, level, logger, the context fields (node, group, subscriber,
source, event; see ``eventmill.log_fields``) and the message folded to one line:

- ``text``: ``2026-01-02T03:04:05.678Z INFO eventmill.broker.observer node=n1
  group=totals subscriber=s1 source=orders: accepted (epoch 3)``;
- ``json``: one object per line with keys ``time``, ``level``, ``logger``, the context
  fields present, ``message`` and, when an exception is attached, ``error``.

The library itself never configures logging; applications that have their own set-up
may add ``ContextFilter`` to their handlers to get the node field.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from eventmill.errors import InvalidSettingsError
from eventmill.log_fields import CURRENT_NODE, FIELDS, one_line

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ContextFilter(logging.Filter):
    """Sets ``record.node`` from ``CURRENT_NODE`` (or ``default_node``) when absent."""

    def __init__(self, default_node: str | None = None) -> None:
        super().__init__()
        self.default_node = default_node

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "node", None) is None:
            record.node = CURRENT_NODE.get() or self.default_node
        return True


def _time(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _error(record: logging.LogRecord) -> str | None:
    if record.exc_info and record.exc_info[1] is not None:
        error = record.exc_info[1]
        return one_line(f"{type(error).__name__}: {error}")
    return None


class TextFormatter(logging.Formatter):
    """One line: time, level, logger, ``key=value`` context fields, message."""

    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(
            f"{key}={value}" for key in FIELDS if (value := getattr(record, key, None))
        )
        line = f"{_time(record)} {record.levelname} {record.name}"
        if context:
            line += f" {context}"
        line += f": {one_line(record.getMessage())}"
        error = _error(record)
        if error is not None:
            line += f" ({error})"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": _time(record),
            "level": record.levelname,
            "logger": record.name,
        }
        for key in FIELDS:
            value = getattr(record, key, None)
            if value:
                data[key] = value
        data["message"] = one_line(record.getMessage())
        error = _error(record)
        if error is not None:
            data["error"] = error
        return json.dumps(data, ensure_ascii=False)


def configure_logging(
    level: str = "INFO",
    format: str = "text",
    *,
    stream: TextIO | None = None,
    default_node: str | None = None,
) -> logging.Handler:
    """Replace the root logger's handlers with one writing ``format`` lines to
    ``stream`` (stderr) at ``level`` and above; return the handler. Raises
    InvalidSettingsError for an unknown level or format."""
    if level.upper() not in LEVELS:
        raise InvalidSettingsError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    if format not in FORMATS:
        raise InvalidSettingsError(f"log format must be text or json, not {format!r}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter())
    handler.addFilter(ContextFilter(default_node))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler

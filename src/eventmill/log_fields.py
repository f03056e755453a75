"""Context fields of eventmill's log records.

Library modules log through the standard ``logging`` module and never configure it.
Records that concern a group, subscriber, source or event carry those as attributes
(``extra=fields(...)``); the node id comes from ``CURRENT_NODE``, which a running node
sets for its tasks. ``eventmill.logs.configure_logging`` renders them (text or JSON).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

CURRENT_NODE: ContextVar[str | None] = ContextVar("eventmill_node", default=None)
"""The id of the node whose task logs (set by ``EventProcessingNode.run``)."""

FIELDS = ("node", "group", "subscriber", "source", "event")
"""The context fields, in the order text lines show them."""


def fields(
    *,
    group: str | None = None,
    subscriber: str | None = None,
    source: object = None,
    event: object = None,
) -> dict[str, Any]:
    """The ``extra`` of a log call: the given fields (sources and events as text)."""
    found: dict[str, Any] = {}
    if group is not None:
        found["group"] = group
    if subscriber is not None:
        found["subscriber"] = subscriber
    if source is not None:
        found["source"] = str(source)
    if event is not None:
        found["event"] = str(event)
    return found


def one_line(text: object) -> str:
    """``text`` with its lines joined by `` | `` (driver messages span several)."""
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())

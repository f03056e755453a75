"""A minimal node for ``eventmill run tests.component.cli_app:make_node`` (in memory)."""

from __future__ import annotations

from eventmill.backends.base import Backend
from eventmill.events import CategoryIdentifier, StoredEvent
from eventmill.node import EventProcessingNode, NodeMode


async def ignore(event: StoredEvent) -> None:
    """Processes nothing of interest."""


def make_node(backend: Backend, *, mode: NodeMode, node_id: str | None) -> EventProcessingNode:
    """One subscriber on the category ``orders``."""
    node = EventProcessingNode(backend, mode=mode, node_id=node_id)
    node.register_subscriber(group="g", source=CategoryIdentifier("orders"), processor=ignore)
    return node


def not_a_node(backend: Backend, *, mode: NodeMode, node_id: str | None) -> object:
    """A factory that returns something else (``eventmill run`` must refuse it)."""
    return "not a node"

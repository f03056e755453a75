"""Service: one unit of asynchronous work that a ServiceManager runs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T_co = TypeVar("T_co", covariant=True)


class Service(ABC, Generic[T_co]):
    """Asynchronous work with a result: ``await service.execute()``.

    A service may run once and return, or loop until cancelled. It must let
    ``asyncio.CancelledError`` propagate (after cleaning up) so that it can be stopped.
    """

    @abstractmethod
    async def execute(self) -> T_co:
        """Do the work; blocks until it is done. Raises whatever the work raises."""


class CallableService(Service[T_co]):
    """A service made from a plain async callable taking no arguments.

    ``CallableService(consumer.consume_all)`` calls the function on every ``execute()``.
    """

    def __init__(self, function: Callable[[], Awaitable[T_co]]) -> None:
        self._function = function

    @property
    def function(self) -> Callable[[], Awaitable[T_co]]:
        """The callable this service runs."""
        return self._function

    async def execute(self) -> T_co:
        """Call the function and await its result; raises what it raises."""
        return await self._function()

    def __repr__(self) -> str:
        name = getattr(self._function, "__qualname__", repr(self._function))
        return f"CallableService({name})"

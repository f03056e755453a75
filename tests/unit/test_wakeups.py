"""WakeupRegistry: watchers woken on their own loops."""

from __future__ import annotations

import asyncio
import threading

from eventmill.backends.wakeups import WakeupRegistry
from eventmill.events import CategoryIdentifier, LogIdentifier


async def test_a_watcher_on_this_threads_loop_is_scheduled_without_the_wakeup_pipe() -> None:
    """From the loop's own thread, watchers are scheduled with call_soon: no write to the
    loop's wake-up pipe (call_soon_threadsafe) on every delivery."""
    registry = WakeupRegistry()
    woken: list[str] = []
    registry.add(CategoryIdentifier("orders"), lambda: woken.append("orders"))
    registry.add(LogIdentifier(), lambda: woken.append("log"))
    registry.add(CategoryIdentifier("other"), lambda: woken.append("other"))
    loop = asyncio.get_running_loop()
    threadsafe_calls: list[object] = []
    loop.call_soon_threadsafe = lambda *args, **kwargs: threadsafe_calls.append(args)  # type: ignore[method-assign, assignment]
    try:
        registry.wake("orders")
        assert woken == []  # scheduled, not called in the waker's frame
        await asyncio.sleep(0)
    finally:
        del loop.call_soon_threadsafe
    assert sorted(woken) == ["log", "orders"]
    assert threadsafe_calls == []


async def test_a_watcher_is_woken_from_another_thread() -> None:
    registry = WakeupRegistry()
    woken = asyncio.Event()
    registry.add(CategoryIdentifier("orders"), woken.set)
    waker = threading.Thread(target=registry.wake, args=("orders",))
    waker.start()
    waker.join()
    async with asyncio.timeout(10):
        await woken.wait()

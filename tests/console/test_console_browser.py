"""The console in real headless Chromium, over three real node processes on PostgreSQL:
the page shows the three nodes and the leader; a SIGKILLed node's sources move to the
others on the page without a reload; a slow group's lag rises and falls on the page.
Screenshots go to ``harness.SCREENSHOTS``."""

from __future__ import annotations

from datetime import timedelta

import pytest
from playwright.async_api import Page

from eventmill.backends.postgres import PostgresBackend
from eventmill.console import ConsoleApp, ConsoleSettings
from eventmill.events import (
    NewEvent,
    source_key,
)
from eventmill.store import EventStore
from tests.console.console_nodes import PACE_TABLE, SETTINGS
from tests.console.harness import (
    SCREENSHOTS,
    NodeProcesses,
    chromium,
    serve,
    wait_for,
)
from tests.postgres_support import fresh_postgres_backend, open_publish

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

TOKEN = "an-operator-token-for-tests"
NODES = ("node-1", "node-2", "node-3")
SOURCES = 6  # fast: 4 partitions, slow: 2


async def table_rows(page: Page, selector: str, attribute: str) -> list[str]:
    """The ``attribute`` of every element matching ``selector``, as the page has them."""
    values: list[str] = await page.eval_on_selector_all(
        selector, f"rows => rows.map(row => row.getAttribute({attribute!r}))"
    )
    return values


async def click_action(page: Page, button: str) -> None:
    """Click an action's button, confirm it, and wait for the server's answer."""
    await page.evaluate("window.eventmillConsole.lastAction = null")
    await page.click(button)
    await page.click("#confirm-ok")
    await page.wait_for_function("window.eventmillConsole.lastAction !== null")


async def last_action_status(page: Page) -> int:
    status: int = await page.evaluate("window.eventmillConsole.lastAction.status")
    return status


async def test_the_page_follows_the_cluster_live() -> None:
    async with fresh_postgres_backend() as backend:
        await follow_the_cluster(backend)


async def follow_the_cluster(backend: PostgresBackend) -> None:
    async with backend.connection() as connection:
        await connection.execute(backend.sql(PACE_TABLE))
    store = EventStore(backend)
    settings = ConsoleSettings(
        subscriber_max_age=SETTINGS.broker_settings.subscriber_manager_subscriber_max_age  # type: ignore[union-attr]
    )
    app = ConsoleApp(backend, settings=settings, token=TOKEN, interval=timedelta(seconds=0.5))
    nodes = NodeProcesses(backend.schema)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        for node_id in NODES:
            nodes.start(node_id)
        async with serve(app) as url, chromium() as browser:
            page = await browser.new_page(viewport={"width": 1280, "height": 1000})
            await page.goto(url)
            loaded_at = await page.evaluate("window.eventmillConsole.loadedAt")

            # Three nodes, alive, one of them the leader; every source held.
            async def three_nodes_and_a_leader() -> bool:
                alive = await table_rows(page, "#nodes tr[data-health=alive]", "data-node")
                leaders = await table_rows(page, "#nodes tr[data-leader=true]", "data-node")
                held = await table_rows(page, "tr[data-state=assigned]", "data-node")
                return sorted(alive) == list(NODES) and len(leaders) == 1 and len(held) == SOURCES

            await wait_for(three_nodes_and_a_leader, 60, "three nodes and a leader on the page")
            [leader] = await table_rows(page, "#nodes tr[data-leader=true]", "data-node")
            holder = await backend.locks.holder("eventmill-coordinator")
            assert holder is not None and holder.application_name == f"eventmill:{leader}"
            role = await page.text_content("#nodes tr[data-leader=true] td:nth-child(3)")
            assert role is not None and role.startswith("leader, term ")
            modes = await page.eval_on_selector_all(
                "#nodes tr[data-node] td:nth-child(2)", "cells => cells.map(c => c.textContent)"
            )
            assert modes == ["both"] * 3
            await page.screenshot(path=str(SCREENSHOTS / "three-nodes.png"), full_page=True)

            # SIGKILL a node holding sources: they move to the others, no reload.
            holders = await table_rows(page, "tr[data-state=assigned]", "data-node")
            victim = next(node for node in NODES if node != leader and node in holders)
            nodes.kill(victim)
            survivors = sorted(set(NODES) - {victim})

            async def sources_moved() -> bool:
                held = await table_rows(page, "tr[data-state=assigned]", "data-node")
                return len(held) == SOURCES and set(held) <= set(survivors)

            await wait_for(sources_moved, 30, f"{victim}'s sources to move on the page")
            taken_over = await table_rows(page, "#changes tr[data-kind='taken over']", "data-kind")
            assert taken_over, "the rebalance list shows no takeover"
            assert await page.evaluate("window.eventmillConsole.loadedAt") == loaded_at
            await page.screenshot(path=str(SCREENSHOTS / "node-killed.png"), full_page=True)

            # A slow group's lag rises on the page, then falls once it is sped up.
            async with backend.connection() as connection:
                await connection.execute(backend.sql("UPDATE {schema}.pace SET delay = 0.5"))
            for number in range(12):  # 60 events in 12 publishes, far faster than 4/s
                await store.stream(category="invoices", stream=f"invoice-{number}").publish(
                    [NewEvent(name="invoice-sent", payload={"n": n}) for n in range(5)]
                )

            async def slow_lag() -> int:
                values = await table_rows(
                    page, "[data-group=slow] [data-group-lag]", "data-group-lag"
                )
                return int(values[0]) if values else 0

            async def lag_rose() -> bool:
                return await slow_lag() >= 30

            await wait_for(lag_rose, 30, "the slow group's lag to rise on the page")
            await page.screenshot(path=str(SCREENSHOTS / "slow-group.png"), full_page=True)
            async with backend.connection() as connection:
                await connection.execute(backend.sql("UPDATE {schema}.pace SET delay = 0"))

            async def lag_fell() -> bool:
                return await slow_lag() == 0

            await wait_for(lag_fell, 30, "the slow group's lag to fall on the page")
            highest = await page.get_attribute("[data-group=slow] svg.chart", "data-max")
            assert highest is not None and int(highest) >= 30
            assert await page.evaluate("window.eventmillConsole.loadedAt") == loaded_at
            await page.screenshot(
                path=str(SCREENSHOTS / "slow-group-caught-up.png"), full_page=True
            )

            # A poison event parks its stream: the page shows it. Actions without the
            # token are refused (403) and change nothing.
            await store.stream(category="invoices", stream="invoice-poison").publish(
                [NewEvent(name="invoice-sent", payload={"poison": True})]
            )

            async def parked_rows() -> list[str]:
                return await table_rows(page, "#parked tr[data-parked]", "data-parked")

            async def parked_shown() -> bool:
                return await parked_rows() == ["slow/invoice-poison"]

            await wait_for(parked_shown, 30, "the parked stream on the page")
            await page.screenshot(path=str(SCREENSHOTS / "parked.png"), full_page=True)

            async def fast_epochs() -> dict[str, int]:
                return {
                    source_key(c.source): c.epoch for c in await backend.checkpoints.list("fast")
                }

            before = await fast_epochs()
            await click_action(page, "#parked button[data-action=retry]")
            assert await last_action_status(page) == 403
            await click_action(page, "[data-group=fast] button[data-action=reset]")
            assert await last_action_status(page) == 403
            [record] = await backend.parked.list()
            assert record.request is None and record.stream.stream == "invoice-poison"
            assert await fast_epochs() == before

            # With the token: the fixed processor retries the held event and the stream
            # leaves the page; the reset gives the group's sources new epochs.
            await page.fill("#token", TOKEN)
            async with backend.connection() as connection:
                await connection.execute(backend.sql("UPDATE {schema}.pace SET fixed = true"))
            await click_action(page, "#parked button[data-action=retry]")
            assert await last_action_status(page) == 200

            async def parked_gone() -> bool:
                return await parked_rows() == []

            await wait_for(parked_gone, 30, "the parked stream to leave the page after retry")
            assert await backend.parked.list() == []
            await click_action(page, "[data-group=fast] button[data-action=reset]")
            assert await last_action_status(page) == 200
            after = await fast_epochs()
            assert after.keys() == before.keys() and all(after[k] > before[k] for k in before)
            assert await page.evaluate("window.eventmillConsole.loadedAt") == loaded_at
    finally:
        nodes.kill_all()


async def test_the_page_names_an_open_publish() -> None:
    async with fresh_postgres_backend() as backend, chromium() as browser:
        await (
            EventStore(backend)
            .stream(category="orders", stream="o-1")
            .publish([NewEvent(name="placed")])
        )
        settings = ConsoleSettings(held_back_warning_seconds=0.0)
        app = ConsoleApp(backend, settings=settings, interval=timedelta(milliseconds=300))
        async with serve(app) as url, open_publish(backend, "stuck-publisher") as (pid, _):
            await (
                EventStore(backend)
                .stream(category="orders", stream="o-2")
                .publish([NewEvent(name="placed")] * 3)
            )
            page = await browser.new_page()
            await page.goto(url)
            await page.wait_for_selector(
                f'#watermark[data-pid="{pid}"][data-events-beyond="3"]', timeout=10_000
            )
            text = await page.inner_text("#watermark")
            assert f"pid {pid}" in text and "stuck-publisher" in text
            warnings = await page.inner_text("#warnings")
            assert "reads held back" in warnings and f"pid {pid}" in warnings
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(SCREENSHOTS / "open-publish.png"), full_page=True)
            await page.close()  # ends its event stream, so the server can stop

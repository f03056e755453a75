"""The test support's schema drop survives a deadlock with a session still working in
the schema (as a killed node's statement does until it ends)."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from psycopg import sql

from tests.postgres_support import (
    TEST_DSN,
    connect,
    drop_schema,
    unique_schema_name,
    wait_for_lock_wait,
)

pytestmark = pytest.mark.postgres


async def test_a_drop_that_deadlocks_with_a_session_in_the_schema_is_tried_again() -> None:
    schema = unique_schema_name()
    name = sql.Identifier(schema)
    async with await connect() as setup:
        await setup.execute(sql.SQL("CREATE SCHEMA {}").format(name))
        for table in ("a", "b"):
            await setup.execute(
                sql.SQL("CREATE TABLE {}.{} (x int)").format(name, sql.Identifier(table))
            )
    async with await psycopg.AsyncConnection.connect(TEST_DSN) as other:
        await other.execute(sql.SQL("INSERT INTO {}.b VALUES (1)").format(name))  # holds b
        dropping = asyncio.create_task(drop_schema(schema))
        # Until the drop holds a and waits for b.
        await wait_for_lock_wait(TEST_DSN, f'DROP SCHEMA IF EXISTS "{schema}"%')
        await other.execute(sql.SQL("SELECT * FROM {}.a").format(name))  # a deadlock
        await other.commit()
        await dropping
    async with await connect() as check:
        cursor = await check.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)
        )
        assert await cursor.fetchone() == (0,)

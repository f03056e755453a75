"""Turning psycopg errors into eventmill errors.

Every PostgreSQL store runs its driver calls inside ``translate_driver_errors(schema)``
so no psycopg exception leaks from a public method: a missing schema object becomes
``SchemaError`` (saying how to install the schema), a refused write condition raised by
``{schema}.publish`` becomes ``UnmetWriteConditionError``, and anything else becomes
``StorageError``, always with the driver error as ``__cause__``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import errors as pg_errors

from eventmill.errors import SchemaError, StorageError

# SQLSTATEs raised by eventmill's own SQL functions (class "EM", not used by PostgreSQL).
UNMET_WRITE_CONDITION = "EM001"
PUBLISH_NOT_FIRST_WRITE = "EM002"
READ_ON_STANDBY = "EM003"
NOT_READ_COMMITTED = "EM004"

_MISSING_OBJECT = (
    pg_errors.UndefinedTable,
    pg_errors.UndefinedFunction,
    pg_errors.InvalidSchemaName,
    pg_errors.UndefinedObject,
)


@contextmanager
def translate_driver_errors(schema: str) -> Iterator[None]:
    """Re-raise psycopg errors raised inside the block as eventmill errors.

    Raises SchemaError when one of eventmill's tables or functions, or the schema
    itself, is missing (the error names the schema), and StorageError for any other
    driver failure (the original is the ``__cause__``).
    """
    try:
        yield
    except _MISSING_OBJECT as error:
        if not _names_schema(error, schema):
            raise StorageError(f"PostgreSQL failed: {error}") from error
        raise SchemaError(
            f"the eventmill schema {schema!r} is not installed or incomplete "
            f"(run `eventmill migrate` or `await backend.install_schema()`): {error}"
        ) from error
    except psycopg.Error as error:
        if error.sqlstate == PUBLISH_NOT_FIRST_WRITE:
            raise StorageError(
                "publish must be the first write of its transaction: publish before "
                "writing anything else, or in a transaction of its own"
            ) from error
        if error.sqlstate == READ_ON_STANDBY:
            raise StorageError(
                "log and category reads need the primary: this PostgreSQL server is a "
                "standby (in recovery), whose lock table does not show the primary's "
                "publishers in flight; connect to the primary (in a multi-host DSN add "
                "target_session_attrs=read-write)"
            ) from error
        raise StorageError(f"PostgreSQL failed: {error}") from error


def _names_schema(error: psycopg.Error, schema: str) -> bool:
    """Whether ``error`` is about an object in ``schema`` (or the schema itself)."""
    message = error.diag.message_primary or str(error)
    return f'"{schema}"' in message or f"{schema}." in message

"""The PostgreSQL backend (needs the ``postgres`` extra: psycopg 3 and psycopg-pool).

Importing it without them raises MissingDependencyError saying what to install.
"""

try:
    import psycopg
    import psycopg_pool
except ImportError as error:
    from eventmill.errors import MissingDependencyError

    raise MissingDependencyError(
        f"the PostgreSQL backend needs {error.name or 'psycopg'}: pip install 'eventmill[postgres]'"
    ) from error

from eventmill.backends.postgres.backend import PostgresBackend
from eventmill.backends.postgres.event_storage import PostgresEventStorage

del psycopg, psycopg_pool

__all__ = ["PostgresBackend", "PostgresEventStorage"]

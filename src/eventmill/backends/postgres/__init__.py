"""The PostgreSQL backend (needs the ``postgres`` extra: psycopg 3 and psycopg-pool)."""

from eventmill.backends.postgres.backend import PostgresBackend
from eventmill.backends.postgres.event_storage import PostgresEventStorage

__all__ = ["PostgresBackend", "PostgresEventStorage"]

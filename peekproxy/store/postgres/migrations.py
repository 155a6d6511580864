"""PostgreSQL schema migrations (``migrations/NNNN_name.sql``, numbered as SQLite's).

The version is the one row of ``schema_version``. Migrating runs in one transaction under a
transaction-scoped advisory lock (:data:`MIGRATION_LOCK`), so several instances starting at
once migrate the database once: the others wait, then find it current. PostgreSQL's DDL is
transactional: a failed migration leaves the database as it was.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import psycopg

from peekproxy.store.sql.migrations import Migration, refuse_newer, shipped_migrations

__all__ = ["MIGRATION_LOCK", "available_migrations", "migrate", "schema_version"]

#: The advisory lock key migrations run under (an arbitrary constant: "peekmig1").
MIGRATION_LOCK = 0x7065656B6D696731

#: All shipped PostgreSQL migrations, ordered by version (1, 2, 3... without gaps).
available_migrations = partial(shipped_migrations, "peekproxy.store.postgres")


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The recorded schema version (0 for a database peekproxy never migrated)."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0


def migrate(conn: psycopg.Connection[Any], where: str, migrations: list[Migration]) -> list[int]:
    """Inside the caller's transaction on ``conn``: take the migration lock, refuse a newer
    database (:class:`~peekproxy.store.StoreVersionError`), apply what is missing and record
    the version. Returns the versions applied."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
    current = schema_version(conn)
    refuse_newer(where, current, migrations)
    applied = []
    for migration in migrations:
        if migration.version > current:
            conn.execute(migration.sql.encode())  # several statements, no parameters
            applied.append(migration.version)
    if applied:
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (applied[-1],))
    return applied

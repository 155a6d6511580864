"""Numbered schema migrations (``migrations/NNNN_name.sql``), applied in order.

The schema version is SQLite's ``PRAGMA user_version``: the number of the last migration
applied. A database whose version is higher than the newest migration we ship was written
by a newer peekproxy and is refused (:class:`StoreVersionError`).
"""

from __future__ import annotations

import sqlite3
from functools import partial

from peekproxy.store.sql.migrations import Migration, shipped_migrations

__all__ = ["Migration", "apply_migrations", "available_migrations", "schema_version"]

#: All shipped SQLite migrations, ordered by version (1, 2, 3... without gaps).
available_migrations = partial(shipped_migrations, "peekproxy.store.sqlite")


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version recorded in the database (0 for a new, empty database)."""
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def apply_migrations(conn: sqlite3.Connection, migrations: list[Migration]) -> list[int]:
    """Apply every migration newer than the database's version, each in its own transaction.

    Returns the versions applied. The caller has checked the database is not newer.
    """
    applied = []
    current = schema_version(conn)
    for migration in migrations:
        if migration.version <= current:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(migration.sql):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {migration.version:d}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        applied.append(migration.version)
    return applied


def _statements(sql: str) -> list[str]:
    statements, buffer = [], ""
    for line in sql.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buffer.splitlines()
    ):
        raise ValueError(f"incomplete SQL statement in migration: {buffer.strip()[:60]!r}")
    return statements

"""The SQLite transaction object: the shared operations over a ``sqlite3`` connection."""

from __future__ import annotations

import sqlite3

from peekproxy.store.sql.transaction import SqlTransaction

__all__ = ["SqliteTransaction"]


class SqliteTransaction(SqlTransaction):
    """:class:`~peekproxy.store.sql.SqlTransaction` over a ``sqlite3`` connection. A read
    gets one over a ``query_only`` reader connection: the write operations are there too,
    and SQLite refuses them."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        super().__init__(conn)
        self._sqlite = conn

    @property
    def connection(self) -> sqlite3.Connection:
        """The connection itself: for tests and benchmarks of the SQLite implementation only."""
        return self._sqlite

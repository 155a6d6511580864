"""Raw SQL on the store's own transaction, for tests that look under the named operations on
either backend: ``rows(tx, "SELECT ...", params)``, ``run(tx, "UPDATE ...", params)`` (``?``
placeholders, the shared SQL's dialect, see ``peekproxy/store/sql/base.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from peekproxy.store.postgres import PostgresTransaction
from peekproxy.store.postgres.connection import PgConnection
from peekproxy.store.sql.base import Connection
from peekproxy.store.sqlite import SqliteTransaction

__all__ = ["connection_of", "rows", "run"]


def connection_of(tx: object) -> Connection:
    """The connection ``tx`` (a SQLite or PostgreSQL transaction) runs on."""
    if isinstance(tx, SqliteTransaction):
        return tx.connection
    if isinstance(tx, PostgresTransaction):
        return PgConnection(tx.raw)
    raise TypeError(f"not a store transaction: {tx!r}")


def rows(tx: object, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Every row of ``sql`` (``?`` placeholders) run in ``tx``, as tuples."""
    return [tuple(row) for row in connection_of(tx).execute(sql, parameters).fetchall()]


def run(tx: object, sql: str, parameters: Sequence[Any] = ()) -> int:
    """Run one statement that returns no rows (``?`` placeholders) in ``tx``; the number of
    rows it changed."""
    return connection_of(tx).execute(sql, parameters).rowcount

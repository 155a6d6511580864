"""The PostgreSQL side of the shared SQL: ``?`` placeholders become ``%s`` (a literal ``%``
becomes ``%%``), once per statement text."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

import psycopg

from peekproxy.store.sql.base import Cursor

__all__ = ["PgConnection", "to_pyformat"]


@lru_cache(maxsize=1024)
def to_pyformat(sql: str) -> str:
    """``sql`` with qmark placeholders as psycopg's ``%s`` (and ``%`` escaped). The shared
    SQL holds no ``?`` inside string literals."""
    return sql.replace("%", "%%").replace("?", "%s")


class PgConnection:
    """A psycopg connection as :class:`~peekproxy.store.sql.Connection` (the shared
    operations' view of a connection)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.raw = conn

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        """Run one statement (``?`` placeholders) on a new cursor."""
        return self.raw.execute(to_pyformat(sql), parameters)

    def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]], /) -> Cursor:
        """Run one statement (``?`` placeholders) once per parameter sequence."""
        cursor = self.raw.cursor()
        cursor.executemany(to_pyformat(sql), list(seq_of_parameters))
        return cursor

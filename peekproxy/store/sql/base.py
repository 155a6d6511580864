"""The base of every operations mixin: the transaction's connection and shared helpers.

The operations are written once, in SQL both engines run (``?`` placeholders, ``INSERT ...
ON CONFLICT``, ``RETURNING``, integers for booleans and ms timestamps, TEXT for JSON, no
engine-only functions), over :class:`Connection`: a ``sqlite3.Connection`` as it is, or
PostgreSQL's adapter (``peekproxy/store/postgres/connection.py``), which turns ``?`` into
``%s``. What differs between the engines is in the engines alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

__all__ = ["Connection", "Cursor", "SqlBase", "dumps"]


def dumps(value: Any) -> str:
    """Compact JSON as stored in the ``*_json`` columns."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Cursor(Protocol):
    """What the operations use of a cursor (DB-API 2.0)."""

    @property
    def rowcount(self) -> int:
        """Rows changed by the statement."""

    def fetchone(self) -> Any:
        """The next row (a tuple) or ``None``."""

    def fetchall(self) -> list[Any]:
        """The remaining rows (tuples)."""

    def __iter__(self) -> Iterator[Any]:
        """The remaining rows (tuples), one by one."""


class Connection(Protocol):
    """What the operations use of a connection: statements with ``?`` placeholders."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        """Run one statement with positional parameters."""

    def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]], /) -> Cursor:
        """Run one statement once per parameter sequence."""


class SqlBase:
    """Holds ``_conn``, the connection the transaction runs on (the engine began it)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def _before_stream_row(self) -> None:
        """Called before each stream position is allocated; an engine's hook (PostgreSQL
        notes that the transaction wrote stream rows, so it notifies the other instances on
        commit; its write lock is taken at ``BEGIN``, see ``store/postgres/engine.py``).
        Nothing by default."""

    def _select_in(
        self, sql: str, ids: Iterable[str], before: Sequence[Any] = ()
    ) -> Iterator[tuple[Any, ...]]:
        """The rows of ``sql`` (holding ``{marks}`` inside ``IN (...)``) for ``ids``, queried in
        chunks of 500 (SQLite's limit on parameters); ``before`` are the parameters ahead of the
        ``IN`` list."""
        id_list = list(ids)
        for start in range(0, len(id_list), 500):
            chunk = id_list[start : start + 500]
            yield from self._conn.execute(
                sql.format(marks=",".join("?" * len(chunk))), [*before, *chunk]
            )

    def _stream_row(self, room_id: str, kind: str, event_id: str | None, now_ms: int) -> int:
        self._before_stream_row()
        rows = self._conn.execute(
            "INSERT INTO room_stream (room_id, kind, event_id, received_ts) VALUES (?, ?, ?, ?) "
            "RETURNING stream_pos",
            (room_id, kind, event_id, now_ms),
        ).fetchall()
        return int(rows[0][0])

    def _insert_event(
        self, room_id: str, event_id: str, pdu: Mapping[str, Any], redacted: bool
    ) -> bool:
        cursor = self._conn.execute(
            "INSERT INTO events (event_id, room_id, pdu_json, redacted) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
            (event_id, room_id, dumps(pdu), int(redacted)),
        )
        return cursor.rowcount == 1

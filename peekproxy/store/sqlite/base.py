"""The base of every operations mixin: the transaction's connection and shared helpers."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

__all__ = ["SqliteBase", "dumps"]


def dumps(value: Any) -> str:
    """Compact JSON as stored in the ``*_json`` columns."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class SqliteBase:
    """Holds ``_conn``, the connection the transaction runs on (the engine began it)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @property
    def connection(self) -> sqlite3.Connection:
        """The connection itself: for tests and benchmarks of the SQLite implementation only."""
        return self._conn

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
        cursor = self._conn.execute(
            "INSERT INTO room_stream (room_id, kind, event_id, received_ts) VALUES (?, ?, ?, ?)",
            (room_id, kind, event_id, now_ms),
        )
        position = cursor.lastrowid
        assert position is not None
        return position

    def _insert_event(
        self, room_id: str, event_id: str, pdu: Mapping[str, Any], redacted: bool
    ) -> bool:
        cursor = self._conn.execute(
            "INSERT OR IGNORE INTO events (event_id, room_id, pdu_json, redacted) "
            "VALUES (?, ?, ?, ?)",
            (event_id, room_id, dumps(pdu), int(redacted)),
        )
        return cursor.rowcount == 1

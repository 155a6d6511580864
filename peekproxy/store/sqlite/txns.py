"""Inbound ``/send`` transaction records (``federation_txns``): a retried transaction gets
its first answer again."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from peekproxy.store.sqlite.base import SqliteBase, dumps

__all__ = ["TxnOps"]


class TxnOps(SqliteBase):
    """The operations of
    :class:`~peekproxy.store.reads.TxnReads`
    and :class:`~peekproxy.store.writes.TxnWrites`
    (documented there)."""

    def txn_response(self, origin: str, txn_id: str) -> dict[str, Any] | None:
        row = self._conn.execute(
            "SELECT response_json FROM federation_txns WHERE origin = ? AND txn_id = ?",
            (origin, txn_id),
        ).fetchone()
        return json.loads(row[0]) if row else None

    def save_txn(self, origin: str, txn_id: str, response: Mapping[str, Any], now_ms: int) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO federation_txns (origin, txn_id, response_json, received_ts) "
            "VALUES (?, ?, ?, ?)",
            (origin, txn_id, dumps(response), now_ms),
        )

"""Inbound ``/send`` transaction records (``federation_txns``): a retried transaction gets
its first answer again."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from peekproxy.store.sql.base import SqlBase, dumps

__all__ = ["TxnOps"]


class TxnOps(SqlBase):
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
            "INSERT INTO federation_txns (origin, txn_id, response_json, received_ts) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (origin, txn_id) DO UPDATE SET "
            "response_json = excluded.response_json, received_ts = excluded.received_ts",
            (origin, txn_id, dumps(response), now_ms),
        )

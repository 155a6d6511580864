"""The transaction object both engines hand to ``fn``: every operations mixin composed over
one connection, and the ``server_info`` facts the engines read and bind on open."""

from __future__ import annotations

from peekproxy.store.sql.ephemeral import EphemeralOps
from peekproxy.store.sql.front import FrontPositionOps
from peekproxy.store.sql.history import HistoryOps
from peekproxy.store.sql.keys import ServerKeyOps
from peekproxy.store.sql.leases import LeaseOps
from peekproxy.store.sql.sync import SyncOps
from peekproxy.store.sql.txns import TxnOps

__all__ = ["SqlTransaction"]


class SqlTransaction(
    SyncOps, HistoryOps, EphemeralOps, TxnOps, ServerKeyOps, FrontPositionOps, LeaseOps
):
    """The named operations of :class:`~peekproxy.store.WriteTransaction` (and so of
    :class:`~peekproxy.store.ReadTransaction`) over the connection the engine began a
    transaction on. A read gets one too: the write operations are there, and the engine's
    read transaction refuses them."""

    def server_info_facts(self) -> dict[str, str]:
        """The ``server_info`` rows: ``server_name`` (once bound), ``created_ts`` (ms)."""
        rows = self._conn.execute("SELECT key, value FROM server_info").fetchall()
        return {str(k): str(v) for k, v in rows}

    def bind_server_name(self, server_name: str, now_ms: int) -> None:
        """Bind the database to ``server_name`` unless it is bound (inside a write
        transaction); ``created_ts`` (ms) is ``now_ms``, when that happened."""
        self._conn.executemany(
            "INSERT INTO server_info (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
            [("server_name", server_name), ("created_ts", str(now_ms))],
        )

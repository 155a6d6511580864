"""The sync front's positions (``front_positions``): which peek stream position a
homeserver ``next_batch`` token (kept as its sha256) stands for, per device."""

from __future__ import annotations

from peekproxy.store.sql.base import SqlBase

__all__ = ["FrontPositionOps"]

#: How many tokens are kept per device (the newest).
KEPT_PER_DEVICE = 20


class FrontPositionOps(SqlBase):
    """The operations of
    :class:`~peekproxy.store.reads.FrontPositionReads`
    and :class:`~peekproxy.store.writes.FrontPositionWrites`
    (documented there)."""

    def front_position(self, user_id: str, device_id: str, token_hash: str) -> int | None:
        row = self._conn.execute(
            "SELECT stream_pos FROM front_positions WHERE user_id = ? AND device_id = ? AND "
            "token_hash = ?",
            (user_id, device_id, token_hash),
        ).fetchone()
        return int(row[0]) if row else None

    def newest_front_position(self, user_id: str, device_id: str) -> int | None:
        row = self._conn.execute(
            "SELECT stream_pos FROM front_positions WHERE user_id = ? AND device_id = ? "
            "ORDER BY rowid DESC LIMIT 1",
            (user_id, device_id),
        ).fetchone()
        return int(row[0]) if row else None

    def save_front_position(
        self, user_id: str, device_id: str, token_hash: str, position: int, now_ms: int
    ) -> None:
        # Deleted, then inserted: a re-saved token becomes the newest row (a new ``rowid``).
        self._conn.execute(
            "DELETE FROM front_positions WHERE user_id = ? AND device_id = ? AND token_hash = ?",
            (user_id, device_id, token_hash),
        )
        self._conn.execute(
            "INSERT INTO front_positions (user_id, device_id, token_hash, "
            "stream_pos, saved_ts) VALUES (?, ?, ?, ?, ?)",
            (user_id, device_id, token_hash, position, now_ms),
        )
        self._conn.execute(
            "DELETE FROM front_positions WHERE user_id = ? AND device_id = ? AND rowid NOT IN "
            "(SELECT rowid FROM front_positions WHERE user_id = ? AND device_id = ? "
            "ORDER BY rowid DESC LIMIT ?)",
            (user_id, device_id, user_id, device_id, KEPT_PER_DEVICE),
        )

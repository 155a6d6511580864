"""Ephemeral events (``m.typing``, ``m.receipt``): one row per user, each on the stream."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from peekproxy.store.sql.base import SqlBase, dumps

__all__ = ["EphemeralOps"]


def _ephemeral_rows(
    room_id: str, edu_type: str, content: Mapping[str, Any]
) -> Iterator[tuple[str, str, dict[str, Any], bool]]:
    """(user ID, receipt type or '', per-user content, typing) for each user an EDU's room
    content speaks of; malformed parts are skipped."""
    if edu_type == "m.typing":
        user_id = content.get("user_id")
        if isinstance(user_id, str):
            typing = content.get("typing") is True
            yield user_id, "", {"room_id": room_id, "user_id": user_id, "typing": typing}, typing
    elif edu_type == "m.receipt":
        for receipt_type, by_user in content.items():
            if not isinstance(receipt_type, str) or not isinstance(by_user, Mapping):
                continue
            for user_id, receipt in by_user.items():
                if isinstance(user_id, str) and isinstance(receipt, Mapping):
                    yield user_id, receipt_type, {receipt_type: {user_id: dict(receipt)}}, False


class EphemeralOps(SqlBase):
    """The operations of
    :class:`~peekproxy.store.reads.EphemeralReads`
    and :class:`~peekproxy.store.writes.EphemeralWrites`
    (documented there)."""

    def save_ephemeral(
        self, room_id: str, edu_type: str, content: Mapping[str, Any], now_ms: int
    ) -> list[tuple[str, int, bool]]:
        written = []
        for user_id, receipt_type, row, typing in _ephemeral_rows(room_id, edu_type, content):
            position = self._stream_row(room_id, "ephemeral", None, now_ms)
            self._conn.execute(
                "INSERT INTO ephemeral (room_id, edu_type, user_id, receipt_type, "
                "content_json, typing, stream_pos) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (room_id, edu_type, user_id, receipt_type) DO UPDATE SET "
                "content_json = excluded.content_json, typing = excluded.typing, "
                "stream_pos = excluded.stream_pos",
                (room_id, edu_type, user_id, receipt_type, dumps(row), int(typing), position),
            )
            written.append((user_id, position, typing))
        return written

    def typing_now(self) -> list[tuple[str, str, int]]:
        return [
            (str(r), str(u), int(p))
            for r, u, p in self._conn.execute(
                "SELECT room_id, user_id, stream_pos FROM ephemeral WHERE typing = 1 "
                "ORDER BY stream_pos"
            )
        ]

    def stop_typing(self, room_id: str, user_id: str, position: int, now_ms: int) -> bool:
        row = self._conn.execute(
            "SELECT stream_pos FROM ephemeral WHERE room_id = ? AND edu_type = 'm.typing' AND "
            "user_id = ? AND typing = 1",
            (room_id, user_id),
        ).fetchone()
        if row is None or int(row[0]) != position:
            return False
        self.save_ephemeral(room_id, "m.typing", {"user_id": user_id, "typing": False}, now_ms)
        return True

"""Device peeks (MSC2753): which device peeks which room, each change a stream row."""

from __future__ import annotations

from peekproxy.store.sql.base import SqlBase

__all__ = ["DevicePeekOps"]


class DevicePeekOps(SqlBase):
    """The operations of
    :class:`~peekproxy.store.reads.DevicePeekReads`
    and :class:`~peekproxy.store.writes.DevicePeekWrites`
    (documented there), and ``device_is_peeking`` of
    :class:`~peekproxy.store.reads.HistoryQueries`."""

    def set_device_peek(
        self, user_id: str, device_id: str, room_id: str, state: str, now_ms: int
    ) -> int:
        position = self._stream_row(room_id, "device", None, now_ms)
        self._conn.execute(
            "INSERT INTO device_peeks (user_id, device_id, room_id, state, created_ts, "
            "changed_pos) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, device_id, room_id) "
            "DO UPDATE SET state = excluded.state, changed_pos = excluded.changed_pos",
            (user_id, device_id, room_id, state, now_ms, position),
        )
        return position

    def device_peek_state(self, user_id: str, device_id: str, room_id: str) -> str | None:
        row = self._conn.execute(
            "SELECT state FROM device_peeks WHERE user_id = ? AND device_id = ? AND room_id = ?",
            (user_id, device_id, room_id),
        ).fetchone()
        return str(row[0]) if row else None

    def device_peek_count(self, room_id: str, state: str = "active") -> int:
        row = self._conn.execute(
            "SELECT COUNT(*) FROM device_peeks WHERE room_id = ? AND state = ?", (room_id, state)
        ).fetchone()
        return int(row[0])

    def device_peeks_of_device(self, user_id: str, device_id: str) -> int:
        row = self._conn.execute(
            "SELECT COUNT(*) FROM device_peeks WHERE user_id = ? AND device_id = ? AND "
            "state = 'active'",
            (user_id, device_id),
        ).fetchone()
        return int(row[0])

    def user_room_peeks(self, user_id: str, room_id: str) -> list[tuple[str, str]]:
        return [
            (str(d), str(s))
            for d, s in self._conn.execute(
                "SELECT device_id, state FROM device_peeks WHERE user_id = ? AND room_id = ? "
                "ORDER BY device_id",
                (user_id, room_id),
            )
        ]

    def end_room_peeks(self, room_id: str, now_ms: int) -> int:
        rows = self._conn.execute(
            "SELECT user_id, device_id FROM device_peeks WHERE room_id = ? AND "
            "state IN ('active', 'dormant')",
            (room_id,),
        ).fetchall()
        for user_id, device_id in rows:
            self.set_device_peek(user_id, device_id, room_id, "ended", now_ms)
        return len(rows)

    def device_peeks(self, user_id: str, device_id: str) -> list[tuple[str, str, int]]:
        return [
            (str(r), str(s), int(p))
            for r, s, p in self._conn.execute(
                "SELECT room_id, state, changed_pos FROM device_peeks WHERE user_id = ? AND "
                "device_id = ? ORDER BY room_id",
                (user_id, device_id),
            )
        ]

    def device_is_peeking(self, user_id: str, device_id: str, room_id: str) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM device_peeks WHERE user_id = ? AND device_id = ? AND room_id = ? AND "
            "state = 'active'",
            (user_id, device_id, room_id),
        ).fetchone()
        return row is not None

    def active_devices(self) -> list[tuple[str, str]]:
        return [
            (str(u), str(d))
            for u, d in self._conn.execute(
                "SELECT DISTINCT user_id, device_id FROM device_peeks WHERE state = 'active'"
            )
        ]

    def device_peek_counts(self, room_id: str | None = None) -> dict[str, tuple[int, int]]:
        counts: dict[str, list[int]] = {}
        where = "state IN ('active', 'dormant')" + (" AND room_id = ?" if room_id else "")
        for room, state, count in self._conn.execute(
            f"SELECT room_id, state, COUNT(*) FROM device_peeks WHERE {where} "
            "GROUP BY room_id, state",
            (room_id,) if room_id else (),
        ):
            counts.setdefault(str(room), [0, 0])[0 if state == "active" else 1] = int(count)
        return {room: (c[0], c[1]) for room, c in counts.items()}

    def device_peek_totals(self) -> dict[str, int]:
        return {
            str(state): int(count)
            for state, count in self._conn.execute(
                "SELECT state, COUNT(*) FROM device_peeks WHERE state IN ('active', 'dormant') "
                "GROUP BY state"
            )
        }

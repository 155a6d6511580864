"""Several instances on one database (docs/cluster.md): the subscription leases (which
instance follows each remote room) and each device's last sync, for the idle reaper of
every instance. The SQL runs on SQLite and PostgreSQL alike (``?`` placeholders,
``ON CONFLICT``, ``RETURNING``)."""

from __future__ import annotations

from peekproxy.core.cluster import Lease
from peekproxy.store.sql.base import SqlBase

__all__ = ["LeaseOps"]


class LeaseOps(SqlBase):
    """The operations of
    :class:`~peekproxy.store.reads.LeaseReads`
    and :class:`~peekproxy.store.writes.LeaseWrites`
    (documented there)."""

    def take_lease(self, room_id: str, owner: str, now_ms: int, expires_ms: int) -> bool:
        row = self._conn.execute(
            "INSERT INTO subscription_leases (room_id, owner, expires_ts) VALUES (?, ?, ?) "
            "ON CONFLICT (room_id) DO UPDATE SET owner = excluded.owner, "
            "expires_ts = excluded.expires_ts WHERE subscription_leases.owner = excluded.owner "
            "OR subscription_leases.expires_ts <= ? RETURNING owner",
            (room_id, owner, expires_ms, now_ms),
        ).fetchone()
        return row is not None

    def renew_leases(self, owner: str, expires_ms: int) -> list[str]:
        return sorted(
            str(r[0])
            for r in self._conn.execute(
                "UPDATE subscription_leases SET expires_ts = ? WHERE owner = ? RETURNING room_id",
                (expires_ms, owner),
            ).fetchall()
        )

    def release_lease(self, room_id: str, owner: str) -> None:
        self._conn.execute(
            "DELETE FROM subscription_leases WHERE room_id = ? AND owner = ?", (room_id, owner)
        )

    def request_end(self, room_id: str, reason: str | None) -> bool:
        cursor = self._conn.execute(
            "UPDATE subscription_leases SET end_reason = ? WHERE room_id = ?", (reason, room_id)
        )
        return cursor.rowcount == 1

    def leases(self, room_id: str | None = None) -> dict[str, Lease]:
        return {
            str(r): Lease(str(r), str(o), int(e), None if x is None else str(x))
            for r, o, e, x in self._conn.execute(
                "SELECT room_id, owner, expires_ts, end_reason FROM subscription_leases"
                + ("" if room_id is None else " WHERE room_id = ?"),
                () if room_id is None else (room_id,),
            )
        }

    def record_sync(self, user_id: str, device_id: str, now_ms: int) -> None:
        self._conn.execute(
            "INSERT INTO device_last_sync (user_id, device_id, synced_ts) VALUES (?, ?, ?) "
            "ON CONFLICT (user_id, device_id) DO UPDATE SET synced_ts = excluded.synced_ts "
            "WHERE device_last_sync.synced_ts < excluded.synced_ts",
            (user_id, device_id, now_ms),
        )

    def record_unsynced_devices(self, now_ms: int) -> int:
        cursor = self._conn.execute(
            "INSERT INTO device_last_sync (user_id, device_id, synced_ts) "
            "SELECT DISTINCT user_id, device_id, ? FROM device_peeks WHERE state = 'active' "
            "ON CONFLICT (user_id, device_id) DO NOTHING",
            (now_ms,),
        )
        return max(0, cursor.rowcount)

    def last_sync(self, user_id: str, device_id: str) -> int | None:
        row = self._conn.execute(
            "SELECT synced_ts FROM device_last_sync WHERE user_id = ? AND device_id = ?",
            (user_id, device_id),
        ).fetchone()
        return None if row is None else int(row[0])

    def idle_devices(self, synced_before_ms: int) -> list[tuple[str, str, int]]:
        return [
            (str(u), str(d), int(t))
            for u, d, t in self._conn.execute(
                "SELECT DISTINCT p.user_id, p.device_id, s.synced_ts FROM device_peeks p "
                "JOIN device_last_sync s ON s.user_id = p.user_id AND s.device_id = p.device_id "
                "WHERE p.state = 'active' AND s.synced_ts < ? ORDER BY s.synced_ts",
                (synced_before_ms,),
            )
        ]

"""Remote subscriptions: one row per room followed (see ``core/subscription.py``)."""

from __future__ import annotations

import json

from peekproxy.core.subscription import Subscription, SubState
from peekproxy.core.sync import FALLBACK_ROOM_VERSION
from peekproxy.store.sql.base import SqlBase, dumps

__all__ = ["SubscriptionOps"]

#: Every column but the key, replaced by a new save.
_UPDATE_ALL = ", ".join(
    f"{column} = excluded.{column}"
    for column in (
        "room_version",
        "state",
        "candidates_json",
        "server",
        "peek_id",
        "remote_interval_ms",
        "last_renewed_ts",
        "renew_at_ts",
        "wanted",
        "linger_until_ts",
        "ended_reason",
        "pending_deletes_json",
    )
)


class SubscriptionOps(SqlBase):
    """The operations of
    :class:`~peekproxy.store.reads.SubscriptionReads`
    and :class:`~peekproxy.store.writes.SubscriptionWrites`
    (documented there)."""

    def save_subscription(self, sub: Subscription) -> None:
        self._conn.execute(
            "INSERT INTO subscriptions (room_id, room_version, state, candidates_json, "
            "server, peek_id, remote_interval_ms, last_renewed_ts, renew_at_ts, wanted, "
            "linger_until_ts, ended_reason, pending_deletes_json) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (room_id) DO UPDATE SET "
            + _UPDATE_ALL,
            (
                sub.room_id,
                sub.room_version,
                sub.state.value,
                dumps(list(sub.candidates)),
                sub.server,
                sub.peek_id,
                sub.remote_interval_ms,
                sub.last_renewed_ms,
                sub.renew_at_ms,
                int(sub.wanted),
                sub.linger_until_ms,
                sub.ended_reason,
                dumps([list(d) for d in sub.pending_deletes]),
            ),
        )

    def load_subscriptions(self, room_id: str | None = None) -> list[Subscription]:
        rows = self._conn.execute(
            "SELECT room_id, room_version, state, candidates_json, server, peek_id, "
            "remote_interval_ms, last_renewed_ts, renew_at_ts, wanted, linger_until_ts, "
            "ended_reason, pending_deletes_json FROM subscriptions"
            + ("" if room_id is None else " WHERE room_id = ?"),
            () if room_id is None else (room_id,),
        ).fetchall()
        return [
            Subscription(
                room_id=r[0],
                room_version=r[1],
                state=SubState(r[2]),
                candidates=tuple(json.loads(r[3])),
                server=r[4],
                peek_id=r[5],
                remote_interval_ms=r[6],
                last_renewed_ms=r[7],
                renew_at_ms=r[8],
                wanted=bool(r[9]),
                linger_until_ms=r[10],
                ended_reason=r[11],
                pending_deletes=tuple((d[0], d[1]) for d in json.loads(r[12])),
            )
            for r in rows
        ]

    def room_version_of(self, room_id: str) -> str:
        row = self._conn.execute(
            "SELECT room_version FROM subscriptions WHERE room_id = ?", (room_id,)
        ).fetchone()
        return str(row[0]) if row and row[0] else FALLBACK_ROOM_VERSION

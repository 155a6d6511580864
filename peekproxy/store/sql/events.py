"""Room events, the room stream, current state, gaps and gap fills."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from peekproxy.core.dag import dag_order
from peekproxy.core.events import event_refs
from peekproxy.core.stream_rules import (
    SnapshotGap,
    SnapshotStep,
    joins_stream_when_late,
    not_yet_held,
    older_than_newest,
    snapshot_gap,
    snapshot_step,
)
from peekproxy.store.sql.base import SqlBase

__all__ = ["EventOps"]


def _depth(row: tuple[str] | None) -> int | None:
    """The ``depth`` of a ``(pdu_json,)`` row when it is an integer (else, or without a row,
    ``None``)."""
    if row is None:
        return None
    depth = json.loads(row[0]).get("depth")
    return depth if isinstance(depth, int) and not isinstance(depth, bool) else None


class EventOps(SqlBase):
    """The operations of
    :class:`~peekproxy.store.reads.RoomEventReads`
    and :class:`~peekproxy.store.writes.RoomEventWrites`
    (documented there)."""

    def known_event_ids(self, event_ids: Iterable[str]) -> set[str]:
        return {
            str(r[0])
            for r in self._select_in(
                "SELECT event_id FROM events WHERE event_id IN ({marks})", event_ids
            )
        }

    def store_snapshot(
        self,
        room_id: str,
        *,
        events: Mapping[str, Mapping[str, Any]],
        redacted: Iterable[str],
        state: Mapping[tuple[str, str], str],
        latest_event_id: str,
        gap: bool,
        now_ms: int,
        history: Sequence[tuple[str, Mapping[str, Any], bool]] | None = None,
        history_complete: bool = False,
    ) -> int:
        redacted_ids = set(redacted)
        for event_id, pdu in events.items():
            self._insert_event(room_id, event_id, pdu, event_id in redacted_ids)
        held = self.in_stream(latest_event_id)
        step = snapshot_step(
            latest_held=held,
            latest_is_newest=held and self.newest_event_ids(room_id, 1) == [latest_event_id],
            latest_depth=None if held else events[latest_event_id].get("depth"),
            newest_depth=None if held else self._newest_depth(room_id),
        )
        if step is SnapshotStep.NOTHING:
            return 0
        self.replace_state(room_id, state)
        if step is SnapshotStep.STATE_ONLY:
            return 0
        # Only when the latest event is new can anything have been missed before it.
        history_ids = []
        for event_id, pdu, is_redacted in history or ():
            self._insert_event(room_id, event_id, pdu, is_redacted)
            history_ids.append(event_id)
        held_ids = {event_id for event_id in history_ids if self.in_stream(event_id)}
        shown = not_yet_held(history_ids, held_ids | {latest_event_id})
        position = 0
        marker = snapshot_gap(
            gap=gap, history_fetched=history is not None, history_complete=history_complete
        )
        if marker is not SnapshotGap.NONE:
            position = self._stream_row(room_id, "gap", None, now_ms)
            if marker is SnapshotGap.CLOSED:
                self.add_gap_fill(room_id, position, [], closed=True)
        for event_id in shown:
            position = self._stream_row(room_id, "event", event_id, now_ms)
        position = self._stream_row(room_id, "event", latest_event_id, now_ms)
        return position

    def history_floor(self, room_id: str) -> int | None:
        gap = self._conn.execute(
            "SELECT stream_pos FROM room_stream WHERE room_id = ? AND kind = 'gap' "
            "ORDER BY stream_pos DESC LIMIT 1",
            (room_id,),
        ).fetchone()
        row = self._conn.execute(
            "SELECT e.pdu_json FROM room_stream s "
            "JOIN events e ON e.event_id = s.event_id WHERE s.room_id = ? AND s.kind = 'event' "
            "AND s.stream_pos > ? ORDER BY s.stream_pos LIMIT 1",
            (room_id, gap[0] if gap else 0),
        ).fetchone()
        return _depth(row)

    def _newest_depth(self, room_id: str) -> int | None:
        row = self._conn.execute(
            "SELECT e.pdu_json FROM room_stream s "
            "JOIN events e ON e.event_id = s.event_id WHERE s.room_id = ? AND s.kind = 'event' "
            "ORDER BY s.stream_pos DESC LIMIT 1",
            (room_id,),
        ).fetchone()
        return _depth(row)

    def judged_events(self, event_ids: Iterable[str]) -> dict[str, tuple[dict[str, Any], str]]:
        return {
            str(event_id): (json.loads(pdu_json), str(status))
            for event_id, pdu_json, status in self._select_in(
                "SELECT event_id, pdu_json, auth_status FROM events WHERE event_id IN ({marks})",
                event_ids,
            )
        }

    def auth_state(
        self, room_id: str, user_ids: Iterable[str]
    ) -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
        rows = self._select_in(
            "SELECT s.type, s.state_key, s.event_id, e.pdu_json FROM room_state s "
            "JOIN events e ON e.event_id = s.event_id WHERE s.room_id = ? AND ("
            "s.type IN ('m.room.create', 'm.room.power_levels', 'm.room.join_rules', "
            "'m.room.third_party_invite') OR "
            "(s.type = 'm.room.member' AND s.state_key IN ({marks})))",
            set(user_ids) or {""},  # one query even without users: the rest of the state
            before=[room_id],
        )
        return {(str(t), str(k)): (str(e), json.loads(p)) for t, k, e, p in rows}

    def store_unshown(
        self,
        room_id: str,
        events: Sequence[tuple[str, Mapping[str, Any], bool]],
        *,
        status: str,
        reasons: Mapping[str, str] | None = None,
    ) -> None:
        reasons = reasons or {}
        for event_id, pdu, redacted in events:
            if self._insert_event(room_id, event_id, pdu, redacted) and status != "accepted":
                self._conn.execute(
                    "UPDATE events SET auth_status = ?, auth_reason = ? WHERE event_id = ?",
                    (status, reasons.get(event_id), event_id),
                )

    def in_stream(self, event_id: str) -> bool:
        return (
            self._conn.execute(
                "SELECT 1 FROM room_stream WHERE event_id = ? AND kind = 'event'", (event_id,)
            ).fetchone()
            is not None
            or self._conn.execute(
                "SELECT 1 FROM gap_events WHERE event_id = ?", (event_id,)
            ).fetchone()
            is not None
        )

    def held_event_ids(self, room_id: str, event_ids: Iterable[str]) -> set[str]:
        ids = list(event_ids)
        on_stream = self._select_in(
            "SELECT event_id FROM room_stream WHERE room_id = ? AND kind = 'event' AND "
            "event_id IN ({marks})",
            ids,
            before=[room_id],
        )
        in_gaps = self._select_in(
            "SELECT event_id FROM gap_events WHERE room_id = ? AND event_id IN ({marks})",
            ids,
            before=[room_id],
        )
        return {str(r[0]) for r in on_stream} | {str(r[0]) for r in in_gaps}

    def add_gap_fill(
        self,
        room_id: str,
        gap_pos: int,
        events: Sequence[tuple[str, Mapping[str, Any], bool]],
        *,
        closed: bool,
    ) -> int:
        row = self._conn.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM gap_events WHERE room_id = ? AND gap_pos = ?",
            (room_id, gap_pos),
        ).fetchone()
        seq = int(row[0])
        ids = []
        for event_id, pdu, redacted in events:
            self._insert_event(room_id, event_id, pdu, redacted)
            ids.append(event_id)
        added = not_yet_held(ids, {event_id for event_id in ids if self.in_stream(event_id)})
        for event_id in added:
            seq += 1
            self._conn.execute(
                "INSERT INTO gap_events (room_id, gap_pos, seq, event_id) VALUES (?, ?, ?, ?)",
                (room_id, gap_pos, seq, event_id),
            )
        self._conn.execute(
            "INSERT INTO gap_fills (room_id, gap_pos, closed) VALUES (?, ?, ?) "
            "ON CONFLICT (room_id, gap_pos) DO UPDATE SET closed = CASE WHEN "
            "excluded.closed > gap_fills.closed THEN excluded.closed ELSE gap_fills.closed END",
            (room_id, gap_pos, int(closed)),
        )
        return len(added)

    def replace_state(self, room_id: str, state: Mapping[tuple[str, str], str]) -> None:
        statuses = {e: s for e, (_, s) in self.judged_events(state.values()).items()}
        self._conn.execute("DELETE FROM room_state WHERE room_id = ?", (room_id,))
        self._conn.executemany(
            "INSERT INTO room_state (room_id, type, state_key, event_id) VALUES (?, ?, ?, ?)",
            [(room_id, t, k, e) for (t, k), e in state.items() if statuses.get(e) != "rejected"],
        )
        promoted = [e for e, s in statuses.items() if s == "soft_failed"]
        self._conn.executemany(
            "UPDATE events SET auth_status = 'accepted' WHERE event_id = ?",
            [(e,) for e in promoted],
        )

    def append_event(
        self,
        room_id: str,
        event_id: str,
        pdu: Mapping[str, Any],
        *,
        redacted: bool,
        now_ms: int,
    ) -> int | None:
        self._insert_event(room_id, event_id, pdu, redacted)
        if self.in_stream(event_id):
            return None
        if self._behind_the_floor(room_id, pdu):
            return None
        position = self._stream_row(room_id, "event", event_id, now_ms)
        state_key = pdu.get("state_key")
        if isinstance(state_key, str):
            self._conn.execute(
                "INSERT INTO room_state (room_id, type, state_key, event_id) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (room_id, type, state_key) DO UPDATE SET event_id = excluded.event_id",
                (room_id, pdu["type"], state_key, event_id),
            )
        return position

    def _behind_the_floor(self, room_id: str, pdu: Mapping[str, Any]) -> bool:
        """Whether ``pdu`` is a late event that stays off the stream (append_event's rule)."""
        depth = pdu.get("depth")
        # The newest depth is cheap; the floor is looked up only for a late event.
        return older_than_newest(depth, self._newest_depth(room_id)) and not joins_stream_when_late(
            depth, self.history_floor(room_id)
        )

    def add_gap(self, room_id: str, now_ms: int) -> int:
        return self._stream_row(room_id, "gap", None, now_ms)

    def append_in_dag_order(
        self,
        room_id: str,
        events: Sequence[tuple[str, Mapping[str, Any], bool]],
        *,
        now_ms: int,
    ) -> tuple[list[str], bool]:
        appended, gap = [], False
        for event_id, pdu, redacted in dag_order(events):
            if self.in_stream(event_id):
                continue
            prevs = set(event_refs(pdu.get("prev_events")))
            # A gap only before an event that goes on the stream: a late one (stored, not
            # appended) would leave a gap row after its own descendants, and a sync would
            # hide them behind it.
            if (
                prevs
                and len(self.known_event_ids(prevs)) < len(prevs)
                and not self._behind_the_floor(room_id, pdu)
            ):
                self.add_gap(room_id, now_ms)
                gap = True
            if self.append_event(room_id, event_id, pdu, redacted=redacted, now_ms=now_ms):
                appended.append(event_id)
        return appended, gap

    def newest_event_ids(self, room_id: str, count: int) -> list[str]:
        return [
            str(r[0])
            for r in self._conn.execute(
                "SELECT event_id FROM room_stream WHERE room_id = ? AND kind = 'event' "
                "ORDER BY stream_pos DESC LIMIT ?",
                (room_id, count),
            )
        ]

    def newest_events(self, room_id: str | None = None) -> dict[str, tuple[str, int]]:
        where = "kind = 'event'" + (" AND room_id = ?" if room_id else "")
        rows = self._conn.execute(
            "SELECT s.room_id, s.event_id, s.received_ts FROM room_stream s JOIN "
            f"(SELECT room_id, MAX(stream_pos) AS pos FROM room_stream WHERE {where} "
            "GROUP BY room_id) n ON s.stream_pos = n.pos",
            (room_id,) if room_id else (),
        )
        return {str(r): (str(e), int(t)) for r, e, t in rows}

    def current_state_ids(self, room_id: str) -> dict[tuple[str, str], str]:
        return {
            (t, k): e
            for t, k, e in self._conn.execute(
                "SELECT type, state_key, event_id FROM room_state WHERE room_id = ?", (room_id,)
            )
        }

    def state_content(self, room_id: str, type: str, state_key: str = "") -> dict[str, Any] | None:
        row = self._conn.execute(
            "SELECT e.pdu_json FROM room_state s JOIN events e ON e.event_id = s.event_id "
            "WHERE s.room_id = ? AND s.type = ? AND s.state_key = ?",
            (room_id, type, state_key),
        ).fetchone()
        if row is None:
            return None
        content = json.loads(row[0]).get("content")
        return content if isinstance(content, dict) else {}

    def membership(self, room_id: str, user_id: str) -> str | None:
        content = self.state_content(room_id, "m.room.member", user_id)
        value = content.get("membership") if content is not None else None
        return value if isinstance(value, str) else None

    def stream_events(self, room_id: str) -> list[tuple[int, str, str | None]]:
        return [
            (int(p), str(k), e)
            for p, k, e in self._conn.execute(
                "SELECT stream_pos, kind, event_id FROM room_stream WHERE room_id = ? AND "
                "kind IN ('event', 'gap') ORDER BY stream_pos",
                (room_id,),
            )
        ]

    def event_pdu(self, event_id: str) -> dict[str, Any] | None:
        row = self._conn.execute(
            "SELECT pdu_json FROM events WHERE event_id = ?", (event_id,)
        ).fetchone()
        return json.loads(row[0]) if row else None

    def max_stream_pos(self) -> int:
        row = self._conn.execute("SELECT MAX(stream_pos) FROM room_stream").fetchone()
        return int(row[0] or 0)

    def find_event(self, event_id: str) -> tuple[str, dict[str, Any], bool] | None:
        row = self._conn.execute(
            "SELECT room_id, pdu_json, redacted FROM events WHERE event_id = ? "
            "AND auth_status = 'accepted'",
            (event_id,),
        ).fetchone()
        return (str(row[0]), json.loads(row[1]), bool(row[2])) if row else None

    def stream_after(
        self, room_id: str, event_id: str, limit: int
    ) -> list[dict[str, Any] | None] | None:
        row = self._conn.execute(
            "SELECT stream_pos FROM room_stream WHERE room_id = ? AND kind = 'event' AND "
            "event_id = ?",
            (room_id, event_id),
        ).fetchone()
        if row is None:
            return None
        return [
            json.loads(pdu_json) if kind == "event" else None
            for kind, pdu_json in self._conn.execute(
                "SELECT s.kind, e.pdu_json FROM room_stream s LEFT JOIN events e ON "
                "e.event_id = s.event_id WHERE s.room_id = ? AND s.stream_pos > ? AND "
                "s.kind IN ('event', 'gap') ORDER BY s.stream_pos LIMIT ?",
                (room_id, row[0], limit),
            )
        ]

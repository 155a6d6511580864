"""What ``/sync`` and the live window read: stream changes and per-device snapshots."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from peekproxy.core.live import StreamChange
from peekproxy.core.sync import (
    DevicePeek,
    RoomView,
    StreamItem,
    SyncSnapshot,
    timeline_event_ids,
)
from peekproxy.core.sync_rules import (
    active_rooms,
    peeks_changed,
    shown_afresh,
    shown_in_sync,
)
from peekproxy.store.sql.devices import DevicePeekOps
from peekproxy.store.sql.events import EventOps
from peekproxy.store.sql.subscriptions import SubscriptionOps

__all__ = ["SyncOps"]

#: A room shown afresh leaves out its gap rows closed with no fetched events of their own.
_NOT_AN_EMPTY_CLOSED_GAP = (
    " AND NOT (kind = 'gap' AND EXISTS (SELECT 1 FROM gap_fills f WHERE f.room_id = "
    "room_stream.room_id AND f.gap_pos = room_stream.stream_pos AND f.closed = 1 AND NOT "
    "EXISTS (SELECT 1 FROM gap_events g WHERE g.room_id = f.room_id AND g.gap_pos = "
    "f.gap_pos)))"
)


class SyncOps(EventOps, DevicePeekOps, SubscriptionOps):
    """The operations of
    :class:`~peekproxy.store.reads.SyncReads`
    (documented there)."""

    def stream_changes(self, after: int | None) -> tuple[list[StreamChange], int]:
        upto = self.max_stream_pos()
        if after is None or upto <= after:
            return [], upto
        rows = self._conn.execute(
            "SELECT s.stream_pos, s.room_id, s.kind, s.event_id, e.pdu_json, e.redacted "
            "FROM room_stream s LEFT JOIN events e ON s.kind = 'event' AND e.event_id = s.event_id "
            "WHERE s.stream_pos > ? ORDER BY s.stream_pos",
            (after,),
        ).fetchall()
        kinds = {row[2] for row in rows}
        edus: dict[int, tuple[str, Any]] = {}
        if "ephemeral" in kinds:
            edus = {
                int(p): (str(t), json.loads(c))
                for t, c, p in self._conn.execute(
                    "SELECT edu_type, content_json, stream_pos FROM ephemeral WHERE stream_pos > ?",
                    (after,),
                )
            }
        devices: dict[int, tuple[str, str, str]] = {}
        if "device" in kinds:
            devices = {
                int(p): (str(u), str(d), str(st))
                for u, d, st, p in self._conn.execute(
                    "SELECT user_id, device_id, state, changed_pos FROM device_peeks "
                    "WHERE changed_pos > ?",
                    (after,),
                )
            }
        changes = []
        for pos, room_id, kind, event_id, pdu_json, redacted in rows:
            if kind == "event":
                changes.append(
                    StreamChange(
                        pos,
                        room_id,
                        kind,
                        event_id=event_id,
                        pdu=json.loads(pdu_json) if pdu_json is not None else None,
                        redacted=bool(redacted),
                    )
                )
            elif kind == "ephemeral":
                edu_type, content = edus.get(pos, (None, None))
                changes.append(StreamChange(pos, room_id, kind, edu_type=edu_type, content=content))
            elif kind == "device":
                device = devices.get(pos)
                changes.append(
                    StreamChange(
                        pos,
                        room_id,
                        kind,
                        device=(device[0], device[1]) if device else None,
                        peek_state=device[2] if device else None,
                    )
                )
            else:
                changes.append(StreamChange(pos, room_id, kind, event_id=event_id))
        return changes, upto

    def _rooms_changed(self, room_ids: Iterable[str], since: int, upto: int) -> bool:
        """Whether any of the rooms has stream items (events, gaps, EDUs) in (since, upto]."""
        ids = list(room_ids)
        if not ids:
            return False
        marks = ",".join("?" * len(ids))
        row = self._conn.execute(
            f"SELECT 1 FROM room_stream WHERE room_id IN ({marks}) AND stream_pos > ? AND "
            "stream_pos <= ? AND kind IN ('event', 'gap', 'ephemeral') LIMIT 1",
            [*ids, since, upto],
        ).fetchone()
        return row is not None

    def _room_view_rows(
        self,
        room_id: str,
        since: int | None,
        upto: int,
        limit: int,
        ephemeral_since: int | None = None,
        *,
        afresh: bool = False,
        ended_at: int | None = None,
    ) -> dict[str, Any]:
        """What the sync builder needs of one room, read in one go (see core/sync.py). The
        EDU rows are those after ``ephemeral_since`` (all when ``None``) plus the typing ones
        (see :class:`~peekproxy.core.sync.RoomView`). ``afresh``: the room is new to the
        device (:func:`~peekproxy.core.sync_rules.shown_afresh`), so a gap row over which
        nothing is missing (closed at once, no fetched events of its own: the first view's
        history joined what was held) is left out; its timeline runs on past it, as on a join.
        A device that already has the room still meets it (decision 4: ``limited`` after a
        re-peek).

        Of the events, only the PDUs a timeline can show are read
        (:func:`~peekproxy.core.sync.timeline_event_ids`: the newest ``limit`` events after
        the last gap, for a view afresh, an incremental one and, for a peek that ended at
        ``ended_at``, its leave entry), besides those of the current state: a 50-event
        ``/send`` wakes every long-poll, and each shows 10 of them."""
        floor = since if since is not None else upto
        rows = (
            "SELECT stream_pos, kind, event_id FROM room_stream WHERE room_id = ? AND "
            "kind IN ('event', 'gap')" + (_NOT_AN_EMPTY_CLOSED_GAP if afresh else "")
        )
        newer = self._conn.execute(
            rows + " AND stream_pos > ? AND stream_pos <= ? ORDER BY stream_pos",
            (room_id, floor, upto),
        ).fetchall()
        older = self._conn.execute(
            rows + " AND stream_pos <= ? ORDER BY stream_pos DESC LIMIT ?",
            (room_id, floor, limit + 2),
        ).fetchall()
        older.reverse()
        has_earlier = False
        if older:
            has_earlier = (
                self._conn.execute(
                    rows + " AND stream_pos < ? LIMIT 1", (room_id, older[0][0])
                ).fetchone()
                is not None
            )
        recent = [StreamItem(int(p), str(k), e) for p, k, e in (*older, *newer)]
        state_ids = self.current_state_ids(room_id)
        wanted = set(state_ids.values())
        for after, until in ((None, upto), (since, upto), (since, ended_at)):
            if until is not None:
                wanted.update(timeline_event_ids(recent, after, until, limit))
        events: dict[str, Any] = {}
        redacted: set[str] = set()
        for event_id, pdu_json, is_redacted in self._select_in(
            "SELECT event_id, pdu_json, redacted FROM events WHERE event_id IN ({marks})", wanted
        ):
            events[event_id] = json.loads(pdu_json)
            if is_redacted:
                redacted.add(event_id)
        # The EDU rows in the range (all of them for a room shown afresh), and the typing rows of
        # the users typing now: the m.typing event lists every user currently typing.
        edu_floor = -1 if ephemeral_since is None else ephemeral_since
        ephemeral = [
            (str(t), json.loads(c), int(p))
            for t, c, p in self._conn.execute(
                "SELECT edu_type, content_json, stream_pos FROM ephemeral WHERE room_id = ? AND "
                "stream_pos <= ? AND (stream_pos > ? OR typing = 1) ORDER BY stream_pos",
                (room_id, upto, edu_floor),
            )
        ]
        return {
            "recent": recent,
            "has_earlier": has_earlier,
            "state_ids": state_ids,
            "events": events,
            "redacted": redacted,
            "ephemeral": ephemeral,
            "room_version": self.room_version_of(room_id),
        }

    def sync_snapshot(
        self,
        user_id: str,
        device_id: str,
        since: int | None,
        full_state: bool,
        limit: int,
    ) -> SyncSnapshot:
        peeks = [DevicePeek(r, s, p) for r, s, p in self.device_peeks(user_id, device_id)]
        upto = self.max_stream_pos()
        active = active_rooms(peeks)
        changed = peeks_changed(peeks, since, full_state)
        if not changed:
            assert since is not None
            changed = self._rooms_changed(active, since, upto)
        views: dict[str, RoomView] = {}
        if changed:
            for peek in peeks:
                if shown_in_sync(peek, since, upto):
                    afresh = shown_afresh(peek, since)
                    rows = self._room_view_rows(
                        peek.room_id,
                        since,
                        upto,
                        limit,
                        ephemeral_since=None if afresh else since,
                        afresh=afresh,
                        ended_at=peek.changed_pos if peek.state != "active" else None,
                    )
                    views[peek.room_id] = RoomView(
                        room_id=peek.room_id,
                        room_version=rows["room_version"],
                        recent=rows["recent"],
                        has_earlier=rows["has_earlier"],
                        state_ids=rows["state_ids"],
                        events=rows["events"],
                        redacted=frozenset(rows["redacted"]),
                        ephemeral=rows["ephemeral"],
                    )
        return SyncSnapshot(upto=upto, peeks=peeks, active=active, changed=changed, views=views)

"""History reads (``/messages``, ``/state``, ``/event``) over the tables of the room stream.

The model (points, tokens, holes, the paging rules) is in :mod:`peekproxy.core.paging`; the
walk that follows it (``read_page``) is still here, with its SQL: to be moved to the core before
a second implementation needs it. Here:
``room_stream`` holds the stream rows (events and gap rows) in ``stream_pos`` order;
``gap_events`` the events fetched for each gap, numbered ``seq`` = 1 for the newest going back;
``gap_fills`` whether a gap is closed. The virtual gap ``G = 0`` precedes a room whose first
stream row is an event with ``prev_events``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from peekproxy.core.paging import HOLE, Backfill, Direction, Page, Point, TokenAhead
from peekproxy.store.sql.events import EventOps
from peekproxy.store.sql.subscriptions import SubscriptionOps

__all__ = ["HistoryOps"]


@dataclass(frozen=True)
class _Item:
    """A history item: an event (``event_id``) or a hole (``event_id is None``)."""

    key: tuple[int, int]
    event_id: str | None

    @property
    def below(self) -> Point:
        """The point just below this event."""
        pos, minus_seq = self.key
        return Point(pos - 1) if minus_seq == 0 else Point(pos, -minus_seq + 1)

    @property
    def at(self) -> Point:
        """The point just above this event."""
        pos, minus_seq = self.key
        return Point(pos, -minus_seq)


class HistoryOps(EventOps, SubscriptionOps):
    """The operations of
    :class:`~peekproxy.store.reads.HistoryQueries`
    (documented there)."""

    def _pdus(self, room_id: str, event_ids: list[str]) -> dict[str, tuple[dict[str, Any], bool]]:
        return {
            str(event_id): (json.loads(pdu_json), bool(redacted))
            for event_id, pdu_json, redacted in self._select_in(
                "SELECT event_id, pdu_json, redacted FROM events WHERE room_id = ? AND "
                "auth_status = 'accepted' AND event_id IN ({marks})",
                event_ids,
                before=[room_id],
            )
        }

    def _gap_closed(self, room_id: str, gap_pos: int) -> bool:
        row = self._conn.execute(
            "SELECT closed FROM gap_fills WHERE room_id = ? AND gap_pos = ?", (room_id, gap_pos)
        ).fetchone()
        return bool(row and row[0])

    def _has_virtual_gap(self, room_id: str) -> bool:
        """Whether history precedes the room's first stream row with no gap row for it: that
        row is an event with ``prev_events`` (a room stored before the first view fetched
        history)."""
        row = self._conn.execute(
            "SELECT s.kind, e.pdu_json FROM room_stream s LEFT JOIN events e ON "
            "e.event_id = s.event_id WHERE s.room_id = ? AND s.kind IN ('event', 'gap') "
            "ORDER BY s.stream_pos LIMIT 1",
            (room_id,),
        ).fetchone()
        if row is None or row[0] != "event" or row[1] is None:
            return False
        prev = json.loads(row[1]).get("prev_events")
        return isinstance(prev, list) and bool(prev)

    def _gap_items(
        self, room_id: str, gap_pos: int, *, backward: bool, seq_from: int
    ) -> Iterator[_Item]:
        """The gap's fetched events (and its hole, unless closed) in page order: backward from
        ``seq >= seq_from``, forward (hole first) those with ``seq < seq_from`` (0: all)."""
        hole = [] if self._gap_closed(room_id, gap_pos) else [_Item((gap_pos, HOLE), None)]
        if backward:
            rows = self._conn.execute(
                "SELECT seq, event_id FROM gap_events WHERE room_id = ? AND gap_pos = ? AND "
                "seq >= ? ORDER BY seq",
                (room_id, gap_pos, seq_from),
            )
        else:
            yield from hole if seq_from == 0 else []
            rows = self._conn.execute(
                "SELECT seq, event_id FROM gap_events WHERE room_id = ? AND gap_pos = ? AND "
                "(? = 0 OR seq < ?) ORDER BY seq DESC",
                (room_id, gap_pos, seq_from, seq_from),
            )
        for seq, event_id in rows:
            yield _Item((gap_pos, -int(seq)), str(event_id))
        if backward:
            yield from hole

    def _backward(self, room_id: str, start: Point) -> Iterator[_Item]:
        """The room's history items older than ``start``, newest first."""
        cursor = self._conn.execute(
            "SELECT stream_pos, kind, event_id FROM room_stream WHERE room_id = ? AND "
            "kind IN ('event', 'gap') AND stream_pos <= ? ORDER BY stream_pos DESC",
            (room_id, start.pos),
        )
        for pos, kind, event_id in cursor:
            if kind == "event":
                if pos < start.pos or start.seq == 0:
                    yield _Item((int(pos), 0), str(event_id))
            else:
                seq_from = start.seq if pos == start.pos and start.seq else 1
                yield from self._gap_items(room_id, int(pos), backward=True, seq_from=seq_from)
        if self._has_virtual_gap(room_id):
            seq_from = start.seq if start.pos == 0 and start.seq else 1
            yield from self._gap_items(room_id, 0, backward=True, seq_from=seq_from)

    def _forward(self, room_id: str, start: Point | None) -> Iterator[_Item]:
        """The room's history items newer than ``start`` (``None``: all), oldest first."""
        if (start is None or (start.pos == 0 and start.seq)) and self._has_virtual_gap(room_id):
            seq_from = start.seq if start is not None else 0
            yield from self._gap_items(room_id, 0, backward=False, seq_from=seq_from)
        floor = 0 if start is None else start.pos
        cursor = self._conn.execute(
            "SELECT stream_pos, kind, event_id FROM room_stream WHERE room_id = ? AND "
            "kind IN ('event', 'gap') AND stream_pos >= ? ORDER BY stream_pos",
            (room_id, floor),
        )
        for pos, kind, event_id in cursor:
            if start is not None and pos == start.pos and (kind == "event" or start.seq == 0):
                continue  # at or below ``start``
            if kind == "event":
                yield _Item((int(pos), 0), str(event_id))
            else:
                seq_from = start.seq if start is not None and pos == start.pos else 0
                yield from self._gap_items(room_id, int(pos), backward=False, seq_from=seq_from)

    def _anchor(self, room_id: str, gap_pos: int) -> str | None:
        """Where a backfill round for the gap starts: its oldest fetched event, else the
        first stream event after it."""
        row = self._conn.execute(
            "SELECT event_id FROM gap_events WHERE room_id = ? AND gap_pos = ? "
            "ORDER BY seq DESC LIMIT 1",
            (room_id, gap_pos),
        ).fetchone()
        if row is None:
            row = self._conn.execute(
                "SELECT event_id FROM room_stream WHERE room_id = ? AND kind = 'event' AND "
                "stream_pos > ? ORDER BY stream_pos LIMIT 1",
                (room_id, gap_pos),
            ).fetchone()
        return str(row[0]) if row else None

    def read_page(
        self,
        room_id: str,
        *,
        from_point: Point | None,
        to_point: Point | None,
        direction: Direction,
        limit: int,
        fill_gaps: bool,
    ) -> Page:
        upto = self.max_stream_pos()
        if from_point is not None and from_point.pos > upto:
            raise TokenAhead(f"position {from_point.pos} is past the stream's head ({upto})")
        version = self.room_version_of(room_id)
        picked: list[_Item] = []
        end: Point | None = None
        backfill: Backfill | None = None
        if direction == "b":
            start = Point(upto) if from_point is None else from_point
            items = self._backward(room_id, start)
            for item in items:
                if to_point is not None and item.key <= to_point.key:
                    break  # ``to`` reached: no ``end``
                if item.event_id is None:  # a hole
                    if not fill_gaps:
                        continue
                    if picked:
                        end = picked[-1].below  # the next page starts at the hole
                        break
                    anchor = self._anchor(room_id, item.key[0])
                    if anchor is None:
                        continue
                    backfill = Backfill(anchor=anchor, gap_pos=item.key[0], room_left=limit)
                    break
                picked.append(item)
                if len(picked) == limit:
                    for older in items:
                        if to_point is not None and older.key <= to_point.key:
                            break
                        if older.event_id is not None or fill_gaps:
                            end = item.below
                            break
                    break
        else:
            start = from_point if from_point is not None else Point(0)
            items = self._forward(room_id, from_point)
            exhausted = True
            for item in items:
                if item.key[0] > upto or (to_point is not None and item.key > to_point.key):
                    exhausted = False  # ``to`` reached: no ``end``
                    break
                if item.event_id is None:  # a hole: no forward backfill
                    if picked:
                        end, exhausted = self._after_hole(room_id, item.key[0]), False
                        break
                    continue
                picked.append(item)
                if len(picked) == limit:
                    more = to_point is None
                    for after in items:
                        if after.event_id is not None and after.key[0] <= upto:
                            more = to_point is None or after.key <= to_point.key
                            break
                    if more or to_point is None:
                        end = item.at
                    exhausted = False
                    break
            if exhausted and picked and to_point is None:
                end = Point(upto)
        ids = [item.event_id for item in picked if item.event_id is not None]
        pdus = self._pdus(room_id, ids)
        events = [(e, *pdus[e]) for e in ids if e in pdus]
        return Page(events=events, start=start, end=end, room_version=version, backfill=backfill)

    def _after_hole(self, room_id: str, gap_pos: int) -> Point:
        """The point just above a gap's hole (below all of its fetched events)."""
        row = self._conn.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM gap_events WHERE room_id = ? AND gap_pos = ?",
            (room_id, gap_pos),
        ).fetchone()
        return Point(gap_pos, int(row[0]) + 1)

    def read_state(self, room_id: str) -> list[tuple[str, dict[str, Any], bool]]:
        return [
            (str(e), json.loads(p), bool(r))
            for e, p, r in self._conn.execute(
                "SELECT s.event_id, e.pdu_json, e.redacted FROM room_state s JOIN events e "
                "ON e.event_id = s.event_id WHERE s.room_id = ? ORDER BY s.type, s.state_key",
                (room_id,),
            )
        ]

    def read_event(self, room_id: str, event_id: str) -> tuple[dict[str, Any], bool] | None:
        return self._pdus(room_id, [event_id]).get(event_id)

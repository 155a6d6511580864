"""Read queries of the delegation API: room history (``/messages``), current state, events.

Functions over a :class:`sqlite3.Connection` (run them through ``Store.read``) plus small
pure helpers. Nothing here does I/O beyond the connection it is given.

**The history of a room** as a client pages through it is, oldest first:

* the room's stream rows (``room_stream``: events in arrival order, and **gap** rows where
  history is missing), in ``stream_pos`` order;
* at each gap row ``G``, the events fetched for it from the target's ``/backfill``
  (``gap_events``), in DAG order: they cannot get positions between existing stream rows, so
  they are kept keyed to the gap, numbered ``seq`` = 1 for the newest (just before the event
  after the gap), 2, 3 ... going back; each backfill round continues below the largest;
* below the fetched events, while the gap is not **closed**, a *hole*: history still
  missing. A backfill round that reaches an event already held (the history before the gap)
  or the room's ``m.room.create`` closes the gap: it then no longer asks for backfill, and
  pages run through it without stopping;
* before the room's first stream row, when that row is an event with ``prev_events`` (a
  room stored before this design, whose first peek kept only the latest event), a virtual
  gap ``G = 0`` that works the same way. A new peek (:mod:`peekproxy.peeks.history`) puts
  the newest events before the latest one on the stream and a gap row before them when
  older history exists, so new rooms start with a real gap row or with ``m.room.create``.

**Points and tokens.** A point sits between two history items; a page returns the items on
one side of it. ``pp1_<P>`` is the point just after stream position ``P`` (everything at
positions ``<= P`` is older, a gap row's fetched events included), so sync tokens stay valid:
``prev_batch`` (first timeline position − 1) and ``next_batch`` (``upto``) are ``from``
tokens as before. ``pp1_<G>_<k>`` points inside the gap at ``G``, just above its fetched
event ``k`` (events ``k``, ``k+1``, ... and everything before the gap are older). As a sort
key a point is ``(P, 0)`` or ``(G, -k)``; a stream event is ``(pos, 0)``, a fetched event
``(G, -seq)``, a hole ``(G, -∞)``.

* ``dir=b`` from ``X`` returns the events older than ``X``, newest first; ``end`` is the
  point just below the last one returned (``pp1_<pos − 1>``, or ``pp1_<G>_<seq + 1>``).
* ``dir=f`` from ``X`` returns the events newer than ``X``, oldest first; ``end`` is the
  point of the last one returned (or the stream's head once it was reached).

A backward page that meets a hole after returning events stops there (its ``end`` is just
above the hole); one that meets a hole first names a :class:`Backfill` for the caller to run
one round (:func:`peekproxy.peeks.history.fill_gap`) and read the page again. Paging back
from the head thus yields every event reachable from the target, in DAG order, exactly once,
across as many rounds as it takes. A round that cannot help (the remote is unreachable) lets
the page pass over the hole (``fill_gaps=False``); the hole stays for a later page. A forward
page stops before a hole with events on both sides, and its ``end`` skips the hole.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from peekproxy.core.events import redact
from peekproxy.core.pdu import signer_key_ids
from peekproxy.core.room_versions import UnknownRoomVersion, room_version
from peekproxy.core.sync import InvalidToken, client_event
from peekproxy.store.rooms import max_stream_pos, room_version_of, select_in

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "Backfill",
    "Direction",
    "InvalidLimit",
    "Page",
    "Point",
    "TokenAhead",
    "device_is_peeking",
    "parse_limit",
    "parse_point",
    "read_event",
    "read_page",
    "read_state",
    "room_version_of",
    "shown_event",
    "signer_key_ids",
]

DEFAULT_LIMIT = 10
MAX_LIMIT = 100

Direction = Literal["b", "f"]


class InvalidLimit(ValueError):
    """``limit`` is not a positive integer."""


class TokenAhead(ValueError):
    """A ``from`` token past the stream's head (this stream never issued it)."""


def parse_limit(value: str | None) -> int:
    """The page size: default 10, at most 100.

    Raises:
        InvalidLimit: not a positive decimal integer.
    """
    if value is None or value == "":
        return DEFAULT_LIMIT
    if not value.isascii() or not value.isdigit() or len(value) > 9:
        raise InvalidLimit(f"limit must be a positive integer, not {value[:20]!r}")
    limit = int(value)
    if limit < 1:
        raise InvalidLimit("limit must be at least 1")
    return min(limit, MAX_LIMIT)


_POINT = re.compile(r"pp1_(0|[1-9][0-9]{0,18})(?:_([1-9][0-9]{0,17}))?")
_MAX_POSITION = 2**63 - 1
#: The sort key's second part for a hole: below every fetched event of its gap.
_HOLE = -(2**63)


@dataclass(frozen=True)
class Point:
    """A point of a room's history (module docstring): just after stream position ``pos``
    (``seq == 0``), or inside the gap at ``pos`` just above its fetched event ``seq``."""

    pos: int
    seq: int = 0

    @property
    def key(self) -> tuple[int, int]:
        return (self.pos, -self.seq)

    def token(self) -> str:
        """``pp1_<pos>`` or ``pp1_<pos>_<seq>``."""
        return f"pp1_{self.pos}" if self.seq == 0 else f"pp1_{self.pos}_{self.seq}"


def parse_point(token: str) -> Point:
    """The point a ``from`` / ``to`` token names: a sync token (``pp1_<pos>``) or a
    ``/messages`` token inside a filled gap (``pp1_<pos>_<seq>``).

    Raises:
        InvalidToken: anything else.
    """
    match = _POINT.fullmatch(token) if isinstance(token, str) else None
    if match is None or int(match.group(1)) > _MAX_POSITION:
        raise InvalidToken(f"invalid token {str(token)[:40]!r}")
    return Point(int(match.group(1)), int(match.group(2) or 0))


@dataclass(frozen=True)
class Backfill:
    """Where a backward page met a hole before any event: the caller runs one backfill round
    for the gap at ``gap_pos`` (:func:`peekproxy.peeks.history.fill_gap`) asking for what
    precedes ``anchor`` (the gap's oldest fetched event, else the first stream event after
    the gap), up to ``room_left`` events, and reads the page again."""

    anchor: str
    gap_pos: int
    room_left: int


@dataclass(frozen=True)
class Page:
    """One page of a room's history."""

    #: (event ID, PDU as stored, stored redacted) in page order.
    events: list[tuple[str, dict[str, Any], bool]]
    #: The point for the ``start`` token (``from``, or its default).
    start: Point
    #: The point for the ``end`` token, or ``None`` when nothing more is there.
    end: Point | None
    room_version: str
    backfill: Backfill | None = None


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


def device_is_peeking(conn: sqlite3.Connection, user_id: str, device_id: str, room_id: str) -> bool:
    """Whether the device's peek of the room is ``active``."""
    row = conn.execute(
        "SELECT 1 FROM device_peeks WHERE user_id = ? AND device_id = ? AND room_id = ? AND "
        "state = 'active'",
        (user_id, device_id, room_id),
    ).fetchone()
    return row is not None


def _pdus(
    conn: sqlite3.Connection, room_id: str, event_ids: list[str]
) -> dict[str, tuple[dict[str, Any], bool]]:
    return {
        str(event_id): (json.loads(pdu_json), bool(redacted))
        for event_id, pdu_json, redacted in select_in(
            conn,
            "SELECT event_id, pdu_json, redacted FROM events WHERE room_id = ? AND "
            "event_id IN ({marks})",
            event_ids,
            before=[room_id],
        )
    }


def _gap_closed(conn: sqlite3.Connection, room_id: str, gap_pos: int) -> bool:
    row = conn.execute(
        "SELECT closed FROM gap_fills WHERE room_id = ? AND gap_pos = ?", (room_id, gap_pos)
    ).fetchone()
    return bool(row and row[0])


def _has_virtual_gap(conn: sqlite3.Connection, room_id: str) -> bool:
    """Whether history precedes the room's first stream row with no gap row for it: that
    row is an event with ``prev_events`` (a room stored before the first view fetched
    history)."""
    row = conn.execute(
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
    conn: sqlite3.Connection, room_id: str, gap_pos: int, *, backward: bool, seq_from: int
) -> Iterator[_Item]:
    """The gap's fetched events (and its hole, unless closed) in page order: backward from
    ``seq >= seq_from``, forward (hole first) those with ``seq < seq_from`` (0: all)."""
    hole = [] if _gap_closed(conn, room_id, gap_pos) else [_Item((gap_pos, _HOLE), None)]
    if backward:
        rows = conn.execute(
            "SELECT seq, event_id FROM gap_events WHERE room_id = ? AND gap_pos = ? AND "
            "seq >= ? ORDER BY seq",
            (room_id, gap_pos, seq_from),
        )
    else:
        yield from hole if seq_from == 0 else []
        rows = conn.execute(
            "SELECT seq, event_id FROM gap_events WHERE room_id = ? AND gap_pos = ? AND "
            "(? = 0 OR seq < ?) ORDER BY seq DESC",
            (room_id, gap_pos, seq_from, seq_from),
        )
    for seq, event_id in rows:
        yield _Item((gap_pos, -int(seq)), str(event_id))
    if backward:
        yield from hole


def _backward(conn: sqlite3.Connection, room_id: str, start: Point) -> Iterator[_Item]:
    """The room's history items older than ``start``, newest first."""
    cursor = conn.execute(
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
            yield from _gap_items(conn, room_id, int(pos), backward=True, seq_from=seq_from)
    if _has_virtual_gap(conn, room_id):
        seq_from = start.seq if start.pos == 0 and start.seq else 1
        yield from _gap_items(conn, room_id, 0, backward=True, seq_from=seq_from)


def _forward(conn: sqlite3.Connection, room_id: str, start: Point | None) -> Iterator[_Item]:
    """The room's history items newer than ``start`` (``None``: all), oldest first."""
    if (start is None or (start.pos == 0 and start.seq)) and _has_virtual_gap(conn, room_id):
        seq_from = start.seq if start is not None else 0
        yield from _gap_items(conn, room_id, 0, backward=False, seq_from=seq_from)
    floor = 0 if start is None else start.pos
    cursor = conn.execute(
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
            yield from _gap_items(conn, room_id, int(pos), backward=False, seq_from=seq_from)


def _anchor(conn: sqlite3.Connection, room_id: str, gap_pos: int) -> str | None:
    """Where a backfill round for the gap starts: its oldest fetched event, else the
    first stream event after it."""
    row = conn.execute(
        "SELECT event_id FROM gap_events WHERE room_id = ? AND gap_pos = ? "
        "ORDER BY seq DESC LIMIT 1",
        (room_id, gap_pos),
    ).fetchone()
    if row is None:
        row = conn.execute(
            "SELECT event_id FROM room_stream WHERE room_id = ? AND kind = 'event' AND "
            "stream_pos > ? ORDER BY stream_pos LIMIT 1",
            (room_id, gap_pos),
        ).fetchone()
    return str(row[0]) if row else None


def read_page(
    conn: sqlite3.Connection,
    room_id: str,
    *,
    from_point: Point | None,
    to_point: Point | None,
    direction: Direction,
    limit: int,
    fill_gaps: bool,
) -> Page:
    """One page of ``room_id``'s history (the rules are in the module docstring).

    Args:
        from_point: the ``from`` token's point; ``None``: the stream's head (``dir=b``) or
            the start of the room's history (``dir=f``).
        to_point: the ``to`` token's point: the page holds only events between ``from`` and
            ``to``; reaching it ends the pagination (no ``end``).
        limit: most events in the page (≥ 1).
        fill_gaps: ``dir=b`` only: name a :class:`Backfill` where the page meets a hole
            before any event; without it (no server to ask, or a round that could not
            help) holes are passed over.

    Raises:
        TokenAhead: ``from_point`` is past the stream's head.
    """
    upto = max_stream_pos(conn)
    if from_point is not None and from_point.pos > upto:
        raise TokenAhead(f"position {from_point.pos} is past the stream's head ({upto})")
    version = room_version_of(conn, room_id)
    picked: list[_Item] = []
    end: Point | None = None
    backfill: Backfill | None = None
    if direction == "b":
        start = Point(upto) if from_point is None else from_point
        items = _backward(conn, room_id, start)
        for item in items:
            if to_point is not None and item.key <= to_point.key:
                break  # ``to`` reached: no ``end``
            if item.event_id is None:  # a hole
                if not fill_gaps:
                    continue
                if picked:
                    end = picked[-1].below  # the next page starts at the hole
                    break
                anchor = _anchor(conn, room_id, item.key[0])
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
        items = _forward(conn, room_id, from_point)
        exhausted = True
        for item in items:
            if item.key[0] > upto or (to_point is not None and item.key > to_point.key):
                exhausted = False  # ``to`` reached: no ``end``
                break
            if item.event_id is None:  # a hole: no forward backfill
                if picked:
                    end, exhausted = _after_hole(conn, room_id, item.key[0]), False
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
    pdus = _pdus(conn, room_id, ids)
    events = [(e, *pdus[e]) for e in ids if e in pdus]
    return Page(events=events, start=start, end=end, room_version=version, backfill=backfill)


def _after_hole(conn: sqlite3.Connection, room_id: str, gap_pos: int) -> Point:
    """The point just above a gap's hole (below all of its fetched events)."""
    row = conn.execute(
        "SELECT COALESCE(MAX(seq), 0) FROM gap_events WHERE room_id = ? AND gap_pos = ?",
        (room_id, gap_pos),
    ).fetchone()
    return Point(gap_pos, int(row[0]) + 1)


def read_state(conn: sqlite3.Connection, room_id: str) -> list[tuple[str, dict[str, Any], bool]]:
    """The room's current state: (event ID, PDU, stored redacted), by (type, state_key)."""
    return [
        (str(e), json.loads(p), bool(r))
        for e, p, r in conn.execute(
            "SELECT s.event_id, e.pdu_json, e.redacted FROM room_state s JOIN events e "
            "ON e.event_id = s.event_id WHERE s.room_id = ? ORDER BY s.type, s.state_key",
            (room_id,),
        )
    ]


def read_event(
    conn: sqlite3.Connection, room_id: str, event_id: str
) -> tuple[dict[str, Any], bool] | None:
    """One stored event of the room: (PDU, stored redacted), or ``None``."""
    return _pdus(conn, room_id, [event_id]).get(event_id)


# -- pure helpers ----------------------------------------------------------------------------


def shown_event(
    pdu: Mapping[str, Any],
    event_id: str,
    *,
    redacted: bool,
    room_id: str,
    version: str,
    now_ms: int,
) -> dict[str, Any]:
    """A stored PDU as a client event with ``room_id``; one stored redacted goes through
    the room version's redaction algorithm first."""
    if redacted:
        with contextlib.suppress(UnknownRoomVersion):
            pdu = redact(pdu, room_version(version))
    return client_event(pdu, event_id, room_id=room_id, now_ms=now_ms)

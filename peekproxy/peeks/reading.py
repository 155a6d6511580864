"""Read queries of the delegation API: room history (``/messages``), current state, events.

Functions over a :class:`sqlite3.Connection` (run them through ``Store.read``) plus small
pure helpers. Nothing here does I/O beyond the connection it is given.

Tokens are the sync tokens (``pp1_<pos>``, :mod:`peekproxy.peeks.sync`): a token for
position ``T`` names the point of the global room stream just after ``T``. So
``prev_batch`` (first timeline position − 1) and ``next_batch`` (``upto``) are both valid
``from`` tokens:

* ``dir=b`` from ``T`` returns the room's events with ``stream_pos <= T``, newest first;
  ``end`` is ``(position of the last returned event) − 1``;
* ``dir=f`` from ``T`` returns the events with ``stream_pos > T``, oldest first;
  ``end`` is the position of the last returned event (or the stream's head).

A page never spans a gap marker with events on both sides: it stops at the gap, and ``end``
then points at the gap so that the next page continues on its far side. Where the gap (or
the start of what peekproxy stores) is met, :func:`read_page` names an ``anchor`` event so
that the caller may fill in from the remote's ``/backfill``.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from peekproxy.federation.events import redact
from peekproxy.federation.pdu import signer_key_ids
from peekproxy.federation.room_versions import UnknownRoomVersion, room_version
from peekproxy.peeks.sync import client_event
from peekproxy.store.rooms import max_stream_pos, room_version_of, select_in

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "Backfill",
    "Direction",
    "InvalidLimit",
    "Page",
    "TokenAhead",
    "device_is_peeking",
    "parse_limit",
    "read_event",
    "read_page",
    "read_state",
    "room_version_of",
    "shown_event",
    "signer_key_ids",
    "stream_event_ids",
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


@dataclass(frozen=True)
class Backfill:
    """Where a backward page ran out of stored history with room left in it.

    ``anchor`` is the earliest stored event on the near side of the gap (or of the start of
    the store): ask the remote's ``/backfill`` with ``v=anchor`` for what precedes it.
    ``room_left`` is how many more events the page may hold.
    """

    anchor: str
    room_left: int
    at_gap: bool


@dataclass(frozen=True)
class Page:
    """One page of a room's stored history."""

    #: (event ID, PDU as stored, stored redacted) in page order.
    events: list[tuple[str, dict[str, Any], bool]]
    #: The stream position for the ``start`` token (``from``, or its default).
    start: int
    #: The stream position for the ``end`` token, or ``None`` when nothing more is there.
    end: int | None
    room_version: str
    backfill: Backfill | None = None


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


def _earliest_event_above(conn: sqlite3.Connection, room_id: str, pos: int) -> str | None:
    row = conn.execute(
        "SELECT event_id FROM room_stream WHERE room_id = ? AND kind = 'event' AND "
        "stream_pos > ? ORDER BY stream_pos LIMIT 1",
        (room_id, pos),
    ).fetchone()
    return str(row[0]) if row else None


def read_page(
    conn: sqlite3.Connection,
    room_id: str,
    *,
    from_pos: int | None,
    to_pos: int | None,
    direction: Direction,
    limit: int,
    fill_gaps: bool,
) -> Page:
    """One page of ``room_id``'s stored history (the rules are in the module docstring).

    Args:
        from_pos: the ``from`` token's position; ``None``: the stream's head (``dir=b``) or
            its start (``dir=f``).
        to_pos: the ``to`` token's position: ``dir=b`` stops at events with
            ``pos <= to_pos``, ``dir=f`` at events with ``pos > to_pos``. Reaching it ends
            the pagination (no ``end``).
        limit: most events in the page (≥ 1).
        fill_gaps: ``dir=b`` only: name a :class:`Backfill` anchor where the page meets a
            gap before any event, or the start of the store with room left (and no
            ``to``). Without it, a gap at the very start of a page is passed over.

    Raises:
        TokenAhead: ``from_pos`` is past the stream's head.
    """
    upto = max_stream_pos(conn)
    if from_pos is not None and from_pos > upto:
        raise TokenAhead(f"position {from_pos} is past the stream's head ({upto})")
    version = room_version_of(conn, room_id)
    picked: list[tuple[int, str]] = []
    end: int | None = None
    backfill: Backfill | None = None
    if direction == "b":
        start = upto if from_pos is None else from_pos
        floor = -1 if to_pos is None else to_pos
        cursor = conn.execute(
            "SELECT stream_pos, kind, event_id FROM room_stream WHERE room_id = ? AND "
            "kind IN ('event', 'gap') AND stream_pos <= ? AND stream_pos > ? "
            "ORDER BY stream_pos DESC",
            (room_id, start, floor),
        )
        exhausted = True
        for pos, kind, event_id in cursor:
            if kind == "gap":
                if picked:
                    end, exhausted = int(pos), False  # the next page starts at the gap
                    break
                if fill_gaps:
                    anchor = _earliest_event_above(conn, room_id, int(pos))
                    if anchor is not None:
                        more = cursor.fetchone() is not None
                        end = int(pos) - 1 if more else None
                        backfill = Backfill(anchor=anchor, room_left=limit, at_gap=True)
                        exhausted = False
                        break
                continue  # a gap at the start of the page: pass over it
            picked.append((int(pos), str(event_id)))
            if len(picked) == limit:
                more = cursor.fetchone() is not None
                if more or (fill_gaps and to_pos is None):
                    end = int(pos) - 1
                exhausted = False
                break
        if exhausted and fill_gaps and to_pos is None:
            # The start of what we store: nothing is stored before the room's earliest
            # stream event (the last one picked, or, with nothing picked, one above ``from``).
            anchor = picked[-1][1] if picked else _earliest_event_above(conn, room_id, -1)
            if anchor is not None:
                backfill = Backfill(anchor=anchor, room_left=limit - len(picked), at_gap=False)
    else:
        start = 0 if from_pos is None else from_pos
        ceiling = upto if to_pos is None else min(to_pos, upto)
        cursor = conn.execute(
            "SELECT stream_pos, kind, event_id FROM room_stream WHERE room_id = ? AND "
            "kind IN ('event', 'gap') AND stream_pos > ? AND stream_pos <= ? "
            "ORDER BY stream_pos",
            (room_id, start, ceiling),
        )
        exhausted = True
        for pos, kind, event_id in cursor:
            if kind == "gap":
                if picked:
                    end, exhausted = int(pos), False  # the next page starts after the gap
                    break
                continue
            picked.append((int(pos), str(event_id)))
            if len(picked) == limit:
                more = cursor.fetchone() is not None
                if more or to_pos is None:
                    end = int(pos)
                exhausted = False
                break
        if exhausted and picked and to_pos is None:
            end = ceiling
    pdus = _pdus(conn, room_id, [event_id for _, event_id in picked])
    events = [(e, *pdus[e]) for _, e in picked if e in pdus]
    return Page(events=events, start=start, end=end, room_version=version, backfill=backfill)


def stream_event_ids(conn: sqlite3.Connection, event_ids: Iterable[str]) -> set[str]:
    """Which of ``event_ids`` are on the room stream (a client sees them when paging)."""
    return {
        str(r[0])
        for r in select_in(
            conn,
            "SELECT event_id FROM room_stream WHERE kind = 'event' AND event_id IN ({marks})",
            event_ids,
        )
    }


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

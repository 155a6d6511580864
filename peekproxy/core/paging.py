"""Paging a room's history (``/messages``): points, tokens, pages, and how a stored event is
shown to a client. Pure: this module is the model (the values and the rules below); the walk
that follows it, turning stream rows, gap fills and holes into a :class:`Page`, is not here
yet but in the SQLite implementation (``store/sqlite/history.py``, ``HistoryOps.read_page``,
behind ``ReadTransaction.read_page``). A second storage implementation should first move that
walk into this module (a pure function over the rows it reads) and have both call it.

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
  gap ``G = 0`` that works the same way. A new peek (:mod:`peekproxy.services.backfill`) puts
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
one round (:func:`peekproxy.services.backfill.fill_gap`) and read the page again. Paging back
from the head thus yields every event reachable from the target, in DAG order, exactly once,
across as many rounds as it takes. A round that cannot help (the remote is unreachable) lets
the page pass over the hole (``fill_gaps=False``); the hole stays for a later page. A forward
page stops before a hole with events on both sides, and its ``end`` skips the hole.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from peekproxy.core.events import redact
from peekproxy.core.room_versions import UnknownRoomVersion, room_version
from peekproxy.core.sync import InvalidToken, client_event

__all__ = [
    "DEFAULT_LIMIT",
    "HOLE",
    "MAX_LIMIT",
    "Backfill",
    "Direction",
    "InvalidLimit",
    "Page",
    "Point",
    "TokenAhead",
    "parse_limit",
    "parse_point",
    "shown_event",
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
HOLE = -(2**63)


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
    for the gap at ``gap_pos`` (:func:`peekproxy.services.backfill.fill_gap`) asking for what
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

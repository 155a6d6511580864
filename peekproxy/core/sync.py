"""The ``/sync`` builder for peeked rooms (MSC2753 ``rooms.peek``).

Pure: no I/O, no clock. The caller reads one consistent snapshot from the store (the device's
peeks, a :class:`RoomView` of each peeked room, the stream position ``upto``) and passes the
time in; :func:`build_sync` turns it into the ``rooms`` part of a sync response.

Facts it relies on (protocol.md §2.5, decisions 7–10; federation.md §7):

* sync tokens are positions of the global room stream (``room_stream.stream_pos``), which
  orders events, gap markers, EDUs and device-peek changes alike; ``next_batch`` is ``upto``
  and a sync covers the positions in ``(since, upto]``;
* a peek that is new in the range (or restored after an idle drop, decision 9), and every
  peek on an initial sync or with ``full_state``, gets the full current state; otherwise a
  room without news is omitted (scenario 2);
* an ended peek shows up once in ``rooms.leave`` with the events between the last sync and
  its end, else as ``{}`` (decisions 7 and 10, scenarios 10 and 14);
* a timeline never spans a gap marker: it holds the newest events after the last gap, the
  gap makes it ``limited`` and the state section then carries the current state, so a client
  that applies ``state`` and then the timeline ends with the room's current state (scenario
  18, decision 4);
* ``prev_batch`` is the position just before the first timeline event: paginating back from
  it yields the events before the timeline.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from peekproxy.core.events import redact
from peekproxy.core.room_versions import UnknownRoomVersion, room_version
from peekproxy.core.sync_rules import shown_afresh, shown_in_sync

__all__ = [
    "FALLBACK_ROOM_VERSION",
    "SYNC_TOKEN_PREFIX",
    "DevicePeek",
    "InvalidToken",
    "RoomView",
    "StreamItem",
    "SyncSnapshot",
    "build_sync",
    "client_event",
    "decode_token",
    "encode_token",
    "timeline_event_ids",
]

SYNC_TOKEN_PREFIX = "pp1_"
#: A room whose version is not recorded (should not happen) is shown with these rules.
FALLBACK_ROOM_VERSION = "10"
#: Stream positions are SQLite integers: at most 2**63 - 1 (19 digits).
_MAX_POSITION = 2**63 - 1
_TOKEN = re.compile(r"pp1_(0|[1-9][0-9]{0,18})")


class InvalidToken(ValueError):
    """A ``since`` / ``from`` token that peekproxy did not issue."""


def encode_token(position: int) -> str:
    """The opaque token for stream position ``position`` (``"pp1_<pos>"``)."""
    if isinstance(position, bool) or not isinstance(position, int):
        raise TypeError(f"stream position must be an int, not {type(position).__name__}")
    if not 0 <= position <= _MAX_POSITION:
        raise ValueError(f"stream position out of range: {position}")
    return f"{SYNC_TOKEN_PREFIX}{position}"


def decode_token(token: str) -> int:
    """The stream position of a token made by :func:`encode_token`.

    Raises:
        InvalidToken: anything else (wrong prefix, sign, leading zeros, non-ASCII digits,
            out of range, not a string).
    """
    match = _TOKEN.fullmatch(token) if isinstance(token, str) else None
    if match is None:
        raise InvalidToken(f"invalid sync token {str(token)[:40]!r}")
    position = int(match.group(1))
    if position > _MAX_POSITION:
        raise InvalidToken(f"invalid sync token {token[:40]!r}")
    return position


@dataclass(frozen=True, slots=True)
class DevicePeek:
    """One device's peek of a room, as stored in ``device_peeks``."""

    room_id: str
    state: str  # "active" | "dormant" | "ended" | "joined" (never shown: the user joined)
    changed_pos: int


@dataclass(frozen=True)
class StreamItem:
    """One row of a room's stream: an event, or a gap marker (history missing before the
    next event). Other kinds are ignored by the builder."""

    pos: int
    kind: str  # "event" | "gap"
    event_id: str | None


@dataclass(frozen=True)
class RoomView:
    """What :func:`build_sync` needs to know about one room."""

    room_id: str
    room_version: str
    #: The room's stream items with ``pos <= upto``, oldest first: at least every item with
    #: ``pos > since``, plus up to ``timeline_limit + 1`` items before that.
    recent: Sequence[StreamItem]
    #: Whether items exist before ``recent[0]``.
    has_earlier: bool
    #: Current state: (type, state_key) -> event ID.
    state_ids: Mapping[tuple[str, str], str]
    #: PDUs as stored, for every event ID of ``state_ids`` and every event ID of ``recent``
    #: that a timeline can show (:func:`timeline_event_ids`); others may be left out.
    events: Mapping[str, Mapping[str, Any]]
    #: Event IDs stored redacted (their content hash did not match).
    redacted: Set[str]
    #: (EDU type, stored content, stream position) of the room's per-user ``m.typing`` /
    #: ``m.receipt`` rows (see :func:`_ephemeral`): at least every row with ``since < pos <=
    #: upto`` (every row up to ``upto`` for a room shown afresh), plus each user's latest
    #: ``m.typing`` row before that when it says they are typing. Content: ``m.typing``
    #: ``{"user_id", "typing"}``; ``m.receipt`` ``{receipt_type: {user_id: {"event_ids",
    #: "data"}}}``.
    ephemeral: Sequence[tuple[str, Mapping[str, Any], int]] = ()


@dataclass(frozen=True)
class SyncSnapshot:
    """Everything one ``/sync`` of a device needs, read from the store in one transaction
    (``ReadTransaction.sync_snapshot``) and passed to :func:`build_sync`."""

    #: The newest stream position the snapshot saw: the sync's ``next_batch``.
    upto: int
    #: Every peek the device ever made (any state), by room ID.
    peeks: list[DevicePeek]
    #: Rooms with an ``active`` peek, sorted: what a waiting sync registers wake-ups for.
    active: list[str]
    #: Whether there is anything to show since ``since`` (always on an initial sync or with
    #: ``full_state``).
    changed: bool
    #: When ``changed``: a view of each room to show (the active peeks, and the peeks that
    #: ended after ``since``), by room ID; else empty.
    views: dict[str, RoomView] = field(default_factory=dict)


def client_event(
    pdu: Mapping[str, Any], event_id: str, *, room_id: str | None, now_ms: int
) -> dict[str, Any]:
    """A PDU in the client-server event format.

    ``room_id`` is omitted when ``None`` (sync timelines and state sections). ``state_key``
    is present only for state events, ``redacts`` only where the PDU has it at the top level
    (room versions 1–10; v11+ keeps it in ``content``). ``unsigned`` holds just ``age``
    (``now_ms - origin_server_ts``, never negative); the PDU's own ``unsigned`` is dropped.
    """
    content = pdu.get("content")
    event: dict[str, Any] = {"event_id": event_id}
    if room_id is not None:
        event["room_id"] = room_id
    event["sender"] = pdu.get("sender")
    event["type"] = pdu.get("type")
    state_key = pdu.get("state_key")
    if isinstance(state_key, str):
        event["state_key"] = state_key
    event["content"] = copy.deepcopy(dict(content)) if isinstance(content, Mapping) else {}
    unsigned: dict[str, Any] = {}
    ts = pdu.get("origin_server_ts")
    if isinstance(ts, int) and not isinstance(ts, bool):
        event["origin_server_ts"] = ts
        unsigned["age"] = max(0, now_ms - ts)
    event["unsigned"] = unsigned
    if "redacts" in pdu:
        event["redacts"] = pdu["redacts"]
    return event


def build_sync(
    *,
    since: int | None,
    upto: int,
    peeks: Sequence[DevicePeek],
    rooms: Mapping[str, RoomView],
    timeline_limit: int = 10,
    full_state: bool = False,
    now_ms: int,
    section: str = "peek",
) -> dict[str, Any]:
    """The sync response for one device's peeks over the stream positions ``(since, upto]``.

    Args:
        since: the position of the client's ``since`` token; ``None`` for an initial sync.
        upto: the stream position the response reaches; becomes ``next_batch``.
        peeks: the device's peeks (one per room; if a room repeats, the latest change wins).
        rooms: a view of every room with an active peek, and of every room whose peek ended
            in the range (without it an ended peek shows as ``{}``). Other rooms are ignored.
        timeline_limit: most events per timeline (values below 0 count as 0).
        full_state: the client's ``full_state``: every active peek gets the full state and
            is shown even without news; its timeline stays incremental.
        now_ms: the current time, for ``unsigned.age``.
        section: the name of the peek section (decision 8: ``peek`` or ``peeking``).

    Returns:
        ``{"next_batch": ..., "rooms": {section: {...}, "leave": {...}}}`` with rooms sorted
        by ID and events in stream order.

    Raises:
        InvalidToken: ``since`` is after ``upto`` (a token this stream never issued).
        ValueError: ``section`` is ``"leave"``.
    """
    if section == "leave":
        raise ValueError("the peek section cannot be called 'leave'")
    if since is not None and since > upto:
        raise InvalidToken(f"sync token {encode_token(since)} is ahead of the stream")
    limit = max(0, timeline_limit)
    latest: dict[str, DevicePeek] = {}
    for peek in peeks:
        known = latest.get(peek.room_id)
        if known is None or peek.changed_pos >= known.changed_pos:
            latest[peek.room_id] = peek

    peeked: dict[str, Any] = {}
    left: dict[str, Any] = {}
    for room_id in sorted(latest):
        peek = latest[room_id]
        view = rooms.get(room_id)
        if peek.state == "active":
            if view is None:
                continue
            if since is None or shown_afresh(peek, since):
                peeked[room_id] = _new_room(view, upto, limit, now_ms)
            else:
                entry = _live_room(view, since, upto, limit, full_state, now_ms)
                if entry is not None:
                    peeked[room_id] = entry
        elif since is not None and shown_in_sync(peek, since, upto):  # an ended peek, once
            left[room_id] = (
                {} if view is None else _left_room(view, since, peek.changed_pos, limit, now_ms)
            )
        # dormant peeks are not shown: the shell restores them (decision 9)
    return {"next_batch": encode_token(upto), "rooms": {section: peeked, "leave": left}}


def _new_room(view: RoomView, upto: int, limit: int, now_ms: int) -> dict[str, Any]:
    """A room the device has not seen (or must see afresh): full state, latest events."""
    items = _items(view.recent, None, upto)
    timeline, cut = _tail(items, limit)
    return _room_entry(
        view,
        timeline,
        limited=cut or view.has_earlier,
        prev_batch=_prev_batch(timeline, upto),
        state=_state_without(view, timeline),
        ephemeral=_ephemeral(view, None, upto),
        now_ms=now_ms,
    )


def _live_room(
    view: RoomView, since: int, upto: int, limit: int, full_state: bool, now_ms: int
) -> dict[str, Any] | None:
    """A room the device already has: the news in ``(since, upto]``, or ``None``."""
    items = _items(view.recent, since, upto)
    ephemeral = _ephemeral(view, since, upto)
    if not items and not ephemeral and not full_state:
        return None
    timeline, limited = _tail(items, limit)
    return _room_entry(
        view,
        timeline,
        limited=limited,
        prev_batch=_prev_batch(timeline, upto),
        state=_state_without(view, timeline) if limited or full_state else [],
        ephemeral=ephemeral,
        now_ms=now_ms,
    )


def _left_room(
    view: RoomView, since: int, ended_pos: int, limit: int, now_ms: int
) -> dict[str, Any]:
    """A room whose peek ended at ``ended_pos``: the events since the last sync, or ``{}``."""
    items = _items(view.recent, since, ended_pos)
    if not any(item.kind == "event" for item in items):
        return {}
    timeline, limited = _tail(items, limit)
    return {
        "timeline": {
            "events": _timeline_events(view, timeline, now_ms),
            "limited": limited,
            "prev_batch": _prev_batch(timeline, ended_pos),
        },
        "state": {"events": []},
    }


def _room_entry(
    view: RoomView,
    timeline: Sequence[StreamItem],
    *,
    limited: bool,
    prev_batch: str,
    state: Sequence[tuple[str, Mapping[str, Any]]],
    ephemeral: list[dict[str, Any]],
    now_ms: int,
) -> dict[str, Any]:
    state_events = [
        client_event(_shown_pdu(view, event_id, pdu), event_id, room_id=None, now_ms=now_ms)
        for event_id, pdu in state
    ]
    return {
        "timeline": {
            "events": _timeline_events(view, timeline, now_ms),
            "limited": limited,
            "prev_batch": prev_batch,
        },
        "state": {"events": state_events},
        "ephemeral": {"events": ephemeral},
        "account_data": {"events": []},
        "unread_notifications": {},
        "summary": {},
    }


def timeline_event_ids(
    recent: Iterable[StreamItem], after: int | None, upto: int, limit: int
) -> list[str]:
    """The event IDs of the timeline :func:`build_sync` shows for a room's stream items
    ``recent`` over ``(after, upto]`` (``after`` ``None``: a room shown afresh) with the
    timeline limit ``limit``: the newest ``limit`` events after the last gap. A store needs
    the PDUs of these only (and of the current state) to build the view."""
    timeline, _ = _tail(_items(recent, after, upto), max(0, limit))
    return [item.event_id for item in timeline if item.event_id is not None]


def _items(recent: Iterable[StreamItem], after: int | None, upto: int) -> list[StreamItem]:
    """The room's events and gaps among ``recent`` with ``after < pos <= upto``, in stream
    order."""
    return sorted(
        (
            item
            for item in recent
            if item.kind in ("event", "gap")
            and item.pos <= upto
            and (after is None or item.pos > after)
        ),
        key=lambda item: item.pos,
    )


def _tail(items: Sequence[StreamItem], limit: int) -> tuple[list[StreamItem], bool]:
    """The newest ``limit`` events after the last gap, and whether anything in ``items``
    (a gap, or more events) comes before them."""
    start = 0
    for index, item in enumerate(items):
        if item.kind == "gap":
            start = index + 1
    events = [item for item in items[start:] if item.kind == "event" and item.event_id]
    kept = events[max(0, len(events) - limit) :] if limit else []
    return kept, start > 0 or len(kept) < len(events)


def _prev_batch(timeline: Sequence[StreamItem], empty: int) -> str:
    return encode_token(max(0, timeline[0].pos - 1) if timeline else empty)


def _state_without(
    view: RoomView, timeline: Iterable[StreamItem]
) -> list[tuple[str, Mapping[str, Any]]]:
    """Current state events that are not in the timeline, sorted by (type, state_key)."""
    in_timeline = {item.event_id for item in timeline}
    state = []
    for key in sorted(view.state_ids):
        event_id = view.state_ids[key]
        pdu = view.events.get(event_id)
        if event_id not in in_timeline and pdu is not None:
            state.append((event_id, pdu))
    return state


def _timeline_events(
    view: RoomView, timeline: Iterable[StreamItem], now_ms: int
) -> list[dict[str, Any]]:
    events = []
    for item in timeline:
        assert item.event_id is not None
        pdu = view.events.get(item.event_id)
        if pdu is None:
            continue  # missing from the caller's snapshot: show the rest
        shown = _shown_pdu(view, item.event_id, pdu)
        events.append(client_event(shown, item.event_id, room_id=None, now_ms=now_ms))
    return events


def _shown_pdu(view: RoomView, event_id: str, pdu: Mapping[str, Any]) -> Mapping[str, Any]:
    """The PDU as clients may see it: stored-redacted events go through the room version's
    redaction algorithm (idempotent on what the store already redacted)."""
    if event_id not in view.redacted:
        return pdu
    try:
        return redact(pdu, room_version(view.room_version))
    except UnknownRoomVersion:
        return pdu


def _ephemeral(view: RoomView, after: int | None, upto: int) -> list[dict[str, Any]]:
    """Client-format typing and receipt events for the range ``(after, upto]``.

    ``m.typing`` (client-server API §Typing Notifications) is there when some user's typing
    changed in the range, and lists **every** user typing as of ``upto`` (each user's
    latest row, in or before the range), sorted. ``m.receipt`` holds the receipts received
    in the range, every user's (a later receipt of a user and type replaces the earlier).
    """
    typing: dict[str, bool] = {}
    saw_typing = False
    receipts: dict[str, dict[str, dict[str, Any]]] = {}
    for edu_type, content, pos in sorted(view.ephemeral, key=lambda edu: edu[2]):
        if pos > upto:
            continue
        in_range = after is None or pos > after
        if edu_type == "m.typing":
            saw_typing = saw_typing or in_range
            user_id = content.get("user_id")
            if isinstance(user_id, str):
                typing[user_id] = content.get("typing") is True
        elif edu_type == "m.receipt" and in_range:
            _merge_receipts(receipts, content)
    events: list[dict[str, Any]] = []
    if saw_typing:
        users = sorted(user for user, is_typing in typing.items() if is_typing)
        events.append({"type": "m.typing", "content": {"user_ids": users}})
    if receipts:
        events.append({"type": "m.receipt", "content": receipts})
    return events


def _merge_receipts(out: dict[str, dict[str, dict[str, Any]]], content: Mapping[str, Any]) -> None:
    """Turn a room's federation receipt content, ``{receipt_type: {user_id: {"event_ids":
    [...], "data": {...}}}}``, into the client shape ``{event_id: {receipt_type: {user_id:
    data}}}``. A later receipt of a user replaces their earlier one of the same type."""
    for receipt_type, by_user in content.items():
        if not isinstance(receipt_type, str) or not isinstance(by_user, Mapping):
            continue
        for user_id, receipt in by_user.items():
            if not isinstance(user_id, str) or not isinstance(receipt, Mapping):
                continue
            event_ids = receipt.get("event_ids")
            data = receipt.get("data")
            if not isinstance(event_ids, list):
                continue
            for types in out.values():
                types.get(receipt_type, {}).pop(user_id, None)
            for event_id in event_ids:
                if isinstance(event_id, str):
                    shown = copy.deepcopy(dict(data)) if isinstance(data, Mapping) else {}
                    out.setdefault(event_id, {}).setdefault(receipt_type, {})[user_id] = shown
    for event_id, types in list(out.items()):
        for receipt_type in [t for t, users in types.items() if not users]:
            del types[receipt_type]
        if not types:
            del out[event_id]

"""Storage of subscriptions, room events, room state, transactions and device peeks.

Plain functions over a :class:`sqlite3.Connection`, run inside ``Store.write`` / ``Store.read``
(one transaction each): the caller composes them so that, for example, a whole ``/send``
transaction and its idempotency record commit together.
"""

from __future__ import annotations

import graphlib
import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from peekproxy.core.events import event_refs
from peekproxy.core.live import StreamChange
from peekproxy.core.subscription import Subscription, SubState
from peekproxy.core.sync import FALLBACK_ROOM_VERSION, DevicePeek, RoomView, StreamItem

__all__ = [
    "add_gap",
    "add_gap_fill",
    "append_event",
    "append_in_dag_order",
    "current_state_ids",
    "dag_order",
    "device_peek_count",
    "held_event_ids",
    "history_floor",
    "in_stream",
    "known_event_ids",
    "load_subscriptions",
    "membership",
    "newest_event_ids",
    "replace_state",
    "save_ephemeral",
    "save_subscription",
    "save_txn",
    "set_device_peek",
    "stop_typing",
    "store_snapshot",
    "stream_changes",
    "txn_response",
    "typing_now",
]


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def save_subscription(conn: sqlite3.Connection, sub: Subscription) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO subscriptions (room_id, room_version, state, candidates_json, "
        "server, peek_id, remote_interval_ms, last_renewed_ts, renew_at_ts, wanted, "
        "linger_until_ts, ended_reason, pending_deletes_json) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            sub.room_id,
            sub.room_version,
            sub.state.value,
            _dumps(list(sub.candidates)),
            sub.server,
            sub.peek_id,
            sub.remote_interval_ms,
            sub.last_renewed_ms,
            sub.renew_at_ms,
            int(sub.wanted),
            sub.linger_until_ms,
            sub.ended_reason,
            _dumps([list(d) for d in sub.pending_deletes]),
        ),
    )


def load_subscriptions(conn: sqlite3.Connection) -> list[Subscription]:
    rows = conn.execute(
        "SELECT room_id, room_version, state, candidates_json, server, peek_id, "
        "remote_interval_ms, last_renewed_ts, renew_at_ts, wanted, linger_until_ts, "
        "ended_reason, pending_deletes_json FROM subscriptions"
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


def _stream_row(
    conn: sqlite3.Connection, room_id: str, kind: str, event_id: str | None, now_ms: int
) -> int:
    cursor = conn.execute(
        "INSERT INTO room_stream (room_id, kind, event_id, received_ts) VALUES (?, ?, ?, ?)",
        (room_id, kind, event_id, now_ms),
    )
    position = cursor.lastrowid
    assert position is not None
    return position


def _insert_event(
    conn: sqlite3.Connection, room_id: str, event_id: str, pdu: Mapping[str, Any], redacted: bool
) -> bool:
    cursor = conn.execute(
        "INSERT OR IGNORE INTO events (event_id, room_id, pdu_json, redacted) VALUES (?, ?, ?, ?)",
        (event_id, room_id, _dumps(pdu), int(redacted)),
    )
    return cursor.rowcount == 1


def select_in(
    conn: sqlite3.Connection, sql: str, ids: Iterable[str], before: Sequence[Any] = ()
) -> Iterator[tuple[Any, ...]]:
    """The rows of ``sql`` (holding ``{marks}`` inside ``IN (...)``) for ``ids``, queried in
    chunks of 500 (SQLite's limit on parameters); ``before`` are the parameters ahead of the
    ``IN`` list."""
    id_list = list(ids)
    for start in range(0, len(id_list), 500):
        chunk = id_list[start : start + 500]
        yield from conn.execute(sql.format(marks=",".join("?" * len(chunk))), [*before, *chunk])


def known_event_ids(conn: sqlite3.Connection, event_ids: Iterable[str]) -> set[str]:
    """Which of ``event_ids`` are stored."""
    return {
        str(r[0])
        for r in select_in(
            conn, "SELECT event_id FROM events WHERE event_id IN ({marks})", event_ids
        )
    }


def room_version_of(conn: sqlite3.Connection, room_id: str) -> str:
    """The room's version as its subscription recorded it, else ``FALLBACK_ROOM_VERSION``."""
    row = conn.execute(
        "SELECT room_version FROM subscriptions WHERE room_id = ?", (room_id,)
    ).fetchone()
    return str(row[0]) if row and row[0] else FALLBACK_ROOM_VERSION


def store_snapshot(
    conn: sqlite3.Connection,
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
    """Store a peek response: its events, the room's state (replaced), and on the room's
    stream the latest event, after ``history`` and a gap marker when history is missing.
    Returns the last stream position written.

    ``history``: (event ID, PDU, stored redacted) of events fetched before the latest event,
    oldest first (DAG order); they go on the stream before it (those already there are
    skipped) but never into the current state: the snapshot's state is the state at the
    latest event. ``history_complete``: nothing is missing before them (they reached history
    held on the stream, or the room's first event). A gap marker precedes them when history
    is missing, and always when ``gap`` (a re-peek, decision 4: syncs get ``limited``); a
    marker over complete history is closed at once, so ``/messages`` does not stop there.

    A snapshot older than what the stream already shows changes neither the stream nor the
    state (its events are stored): its latest event is held but no longer the newest (a
    ``/send`` brought newer events while the snapshot was on its way), or it is new but
    deeper in the DAG than the newest event shown. Appending it would put it after its
    descendants, and its state would roll back theirs.
    """
    redacted_ids = set(redacted)
    for event_id, pdu in events.items():
        _insert_event(conn, room_id, event_id, pdu, event_id in redacted_ids)
    position = 0
    if in_stream(conn, latest_event_id):
        if newest_event_ids(conn, room_id, 1) == [latest_event_id]:
            replace_state(conn, room_id, state)
        return position
    depth, newest = events[latest_event_id].get("depth"), _newest_depth(conn, room_id)
    if isinstance(depth, int) and newest is not None and depth < newest:
        return position
    replace_state(conn, room_id, state)
    # Only when the latest event is new can anything have been missed before it.
    shown = []
    for event_id, pdu, is_redacted in history or ():
        _insert_event(conn, room_id, event_id, pdu, is_redacted)
        if not in_stream(conn, event_id) and event_id != latest_event_id:
            shown.append(event_id)
    if gap or (history is not None and not history_complete):
        position = _stream_row(conn, room_id, "gap", None, now_ms)
        if history is not None and history_complete:
            # Decision 4: a re-peek is gappy for the sync (``limited``) even when the fetched
            # history joins what is held; the gap is closed, so paging runs through it.
            add_gap_fill(conn, room_id, position, [], closed=True)
    for event_id in dict.fromkeys(shown):
        position = _stream_row(conn, room_id, "event", event_id, now_ms)
    position = _stream_row(conn, room_id, "event", latest_event_id, now_ms)
    return position


def history_floor(conn: sqlite3.Connection, room_id: str) -> int | None:
    """The ``depth`` of the event the room's stream resumes with after its newest gap (or,
    with no gap, of its first event: the latest event of the first peek), ``None`` for an
    empty stream. History below it is what the gap (or the peek's start) stands for."""
    gap = conn.execute(
        "SELECT stream_pos FROM room_stream WHERE room_id = ? AND kind = 'gap' "
        "ORDER BY stream_pos DESC LIMIT 1",
        (room_id,),
    ).fetchone()
    row = conn.execute(
        "SELECT json_extract(e.pdu_json, '$.depth') FROM room_stream s "
        "JOIN events e ON e.event_id = s.event_id WHERE s.room_id = ? AND s.kind = 'event' "
        "AND s.stream_pos > ? ORDER BY s.stream_pos LIMIT 1",
        (room_id, gap[0] if gap else 0),
    ).fetchone()
    return row[0] if row is not None and isinstance(row[0], int) else None


def _newest_depth(conn: sqlite3.Connection, room_id: str) -> int | None:
    row = conn.execute(
        "SELECT json_extract(e.pdu_json, '$.depth') FROM room_stream s "
        "JOIN events e ON e.event_id = s.event_id WHERE s.room_id = ? AND s.kind = 'event' "
        "ORDER BY s.stream_pos DESC LIMIT 1",
        (room_id,),
    ).fetchone()
    return row[0] if row is not None and isinstance(row[0], int) else None


def in_stream(conn: sqlite3.Connection, event_id: str) -> bool:
    """Whether a client sees the event when paging: on a room stream, or in a filled gap
    (not only stored)."""
    return (
        conn.execute(
            "SELECT 1 FROM room_stream WHERE event_id = ? AND kind = 'event'", (event_id,)
        ).fetchone()
        is not None
        or conn.execute("SELECT 1 FROM gap_events WHERE event_id = ?", (event_id,)).fetchone()
        is not None
    )


def held_event_ids(conn: sqlite3.Connection, room_id: str, event_ids: Iterable[str]) -> set[str]:
    """Which of ``event_ids`` a client sees when paging ``room_id``: on its stream or in
    one of its filled gaps."""
    ids = list(event_ids)
    on_stream = select_in(
        conn,
        "SELECT event_id FROM room_stream WHERE room_id = ? AND kind = 'event' AND "
        "event_id IN ({marks})",
        ids,
        before=[room_id],
    )
    in_gaps = select_in(
        conn,
        "SELECT event_id FROM gap_events WHERE room_id = ? AND event_id IN ({marks})",
        ids,
        before=[room_id],
    )
    return {str(r[0]) for r in on_stream} | {str(r[0]) for r in in_gaps}


def add_gap_fill(
    conn: sqlite3.Connection,
    room_id: str,
    gap_pos: int,
    events: Sequence[tuple[str, Mapping[str, Any], bool]],
    *,
    closed: bool,
) -> int:
    """Keep backfilled events for the gap at stream position ``gap_pos`` (0: before the
    room's first stream event): (event ID, PDU, stored redacted), **newest first**, all
    older than what the gap holds already. Events a client can already see are skipped.
    ``closed``: the history before the gap is now complete. Neither the stream nor the
    current state changes. Returns how many events were added."""
    row = conn.execute(
        "SELECT COALESCE(MAX(seq), 0) FROM gap_events WHERE room_id = ? AND gap_pos = ?",
        (room_id, gap_pos),
    ).fetchone()
    seq = int(row[0])
    added = 0
    for event_id, pdu, redacted in events:
        _insert_event(conn, room_id, event_id, pdu, redacted)
        if in_stream(conn, event_id):
            continue
        seq += 1
        added += 1
        conn.execute(
            "INSERT INTO gap_events (room_id, gap_pos, seq, event_id) VALUES (?, ?, ?, ?)",
            (room_id, gap_pos, seq, event_id),
        )
    conn.execute(
        "INSERT INTO gap_fills (room_id, gap_pos, closed) VALUES (?, ?, ?) "
        "ON CONFLICT (room_id, gap_pos) DO UPDATE SET closed = MAX(closed, excluded.closed)",
        (room_id, gap_pos, int(closed)),
    )
    return added


def replace_state(
    conn: sqlite3.Connection, room_id: str, state: Mapping[tuple[str, str], str]
) -> None:
    """Make ``state`` ((type, state_key) → event ID) the room's whole current state."""
    conn.execute("DELETE FROM room_state WHERE room_id = ?", (room_id,))
    conn.executemany(
        "INSERT INTO room_state (room_id, type, state_key, event_id) VALUES (?, ?, ?, ?)",
        [(room_id, t, k, e) for (t, k), e in state.items()],
    )


def append_event(
    conn: sqlite3.Connection,
    room_id: str,
    event_id: str,
    pdu: Mapping[str, Any],
    *,
    redacted: bool,
    now_ms: int,
) -> int | None:
    """Append one event to the room's stream (once: ``None`` when it was already there).
    A state event becomes the room's current state for its (type, state_key).

    An event that arrives late, below the room's :func:`history_floor` (its ``depth`` is
    lower than the event after the newest gap), is stored but not appended (``None``): it
    belongs to the history that gap stands for, and appending it would put it after its
    descendants."""
    _insert_event(conn, room_id, event_id, pdu, redacted)
    if in_stream(conn, event_id):
        return None
    depth = pdu.get("depth")
    if isinstance(depth, int):
        newest = _newest_depth(conn, room_id)  # cheap; the floor is looked up only when late
        if newest is not None and depth < newest:
            floor = history_floor(conn, room_id)
            if floor is not None and depth < floor:
                return None
    position = _stream_row(conn, room_id, "event", event_id, now_ms)
    state_key = pdu.get("state_key")
    if isinstance(state_key, str):
        conn.execute(
            "INSERT OR REPLACE INTO room_state (room_id, type, state_key, event_id) "
            "VALUES (?, ?, ?, ?)",
            (room_id, pdu["type"], state_key, event_id),
        )
    return position


def add_gap(conn: sqlite3.Connection, room_id: str, now_ms: int) -> int:
    """Mark that history is missing at this point of the room's stream."""
    return _stream_row(conn, room_id, "gap", None, now_ms)


def append_in_dag_order(
    conn: sqlite3.Connection,
    room_id: str,
    events: Sequence[tuple[str, Mapping[str, Any], bool]],
    *,
    now_ms: int,
) -> tuple[list[str], bool]:
    """Append (event ID, PDU, redacted) ``events`` of one room in DAG order: each after
    its ``prev_events`` (ties by ``depth``, then as given), each once. An event with a
    ``prev_events`` entry that is neither stored nor among ``events`` gets a gap marker
    before it. Returns the IDs appended to the stream (see :func:`append_event` for the
    ones that are only stored) and whether a gap was marked."""
    appended, gap = [], False
    for event_id, pdu, redacted in dag_order(events):
        if in_stream(conn, event_id):
            continue
        prevs = set(event_refs(pdu.get("prev_events")))
        if prevs and len(known_event_ids(conn, prevs)) < len(prevs):
            add_gap(conn, room_id, now_ms)
            gap = True
        if append_event(conn, room_id, event_id, pdu, redacted=redacted, now_ms=now_ms):
            appended.append(event_id)
    return appended, gap


def dag_order(
    events: Sequence[tuple[str, Mapping[str, Any], bool]],
) -> list[tuple[str, Mapping[str, Any], bool]]:
    """``events`` sorted topologically by ``prev_events`` (parents first; among events
    ready together, lower ``depth`` first, then as given). Duplicates are dropped."""
    by_id: dict[str, tuple[int, tuple[str, Mapping[str, Any], bool]]] = {}
    for index, item in enumerate(events):
        by_id.setdefault(item[0], (index, item))
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for event_id, (_, (_, pdu, _)) in by_id.items():
        sorter.add(event_id, *(p for p in event_refs(pdu.get("prev_events")) if p in by_id))
    try:
        sorter.prepare()
    except graphlib.CycleError:  # only forged events make a cycle: fall back to depth
        return [item for _, item in sorted(by_id.values(), key=lambda v: _depth_key(*v))]
    ordered: list[tuple[str, Mapping[str, Any], bool]] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=lambda e: _depth_key(*by_id[e]))
        ordered.extend(by_id[e][1] for e in ready)
        sorter.done(*ready)
    return ordered


def _depth_key(index: int, item: tuple[str, Mapping[str, Any], bool]) -> tuple[int, int]:
    depth = item[1].get("depth")
    return (depth if isinstance(depth, int) else 0, index)


def newest_event_ids(conn: sqlite3.Connection, room_id: str, count: int) -> list[str]:
    """The IDs of the room's newest ``count`` events on its stream, newest first."""
    return [
        str(r[0])
        for r in conn.execute(
            "SELECT event_id FROM room_stream WHERE room_id = ? AND kind = 'event' "
            "ORDER BY stream_pos DESC LIMIT ?",
            (room_id, count),
        )
    ]


def current_state_ids(conn: sqlite3.Connection, room_id: str) -> dict[tuple[str, str], str]:
    return {
        (t, k): e
        for t, k, e in conn.execute(
            "SELECT type, state_key, event_id FROM room_state WHERE room_id = ?", (room_id,)
        )
    }


def state_content(
    conn: sqlite3.Connection, room_id: str, type: str, state_key: str = ""
) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT e.pdu_json FROM room_state s JOIN events e ON e.event_id = s.event_id "
        "WHERE s.room_id = ? AND s.type = ? AND s.state_key = ?",
        (room_id, type, state_key),
    ).fetchone()
    if row is None:
        return None
    content = json.loads(row[0]).get("content")
    return content if isinstance(content, dict) else {}


def txn_response(conn: sqlite3.Connection, origin: str, txn_id: str) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT response_json FROM federation_txns WHERE origin = ? AND txn_id = ?",
        (origin, txn_id),
    ).fetchone()
    return json.loads(row[0]) if row else None


def save_txn(
    conn: sqlite3.Connection, origin: str, txn_id: str, response: Mapping[str, Any], now_ms: int
) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO federation_txns (origin, txn_id, response_json, received_ts) "
        "VALUES (?, ?, ?, ?)",
        (origin, txn_id, _dumps(response), now_ms),
    )


def _ephemeral_rows(
    room_id: str, edu_type: str, content: Mapping[str, Any]
) -> Iterator[tuple[str, str, dict[str, Any], bool]]:
    """(user ID, receipt type or '', per-user content, typing) for each user an EDU's room
    content speaks of; malformed parts are skipped."""
    if edu_type == "m.typing":
        user_id = content.get("user_id")
        if isinstance(user_id, str):
            typing = content.get("typing") is True
            yield user_id, "", {"room_id": room_id, "user_id": user_id, "typing": typing}, typing
    elif edu_type == "m.receipt":
        for receipt_type, by_user in content.items():
            if not isinstance(receipt_type, str) or not isinstance(by_user, Mapping):
                continue
            for user_id, receipt in by_user.items():
                if isinstance(user_id, str) and isinstance(receipt, Mapping):
                    yield user_id, receipt_type, {receipt_type: {user_id: dict(receipt)}}, False


def save_ephemeral(
    conn: sqlite3.Connection, room_id: str, edu_type: str, content: Mapping[str, Any], now_ms: int
) -> list[tuple[str, int, bool]]:
    """Store an ``m.typing`` or ``m.receipt`` EDU's content for one room, one row per user
    (and receipt type), each with its own stream position; a user's row replaces their
    previous one of the same key.

    ``content``: ``m.typing`` ``{"user_id": ..., "typing": bool}`` (the EDU's content);
    ``m.receipt`` ``{receipt_type: {user_id: {"event_ids": [...], "data": {...}}}}`` (the
    EDU's content for this room). Returns (user ID, stream position, typing) per row
    written, in order.
    """
    written = []
    for user_id, receipt_type, row, typing in _ephemeral_rows(room_id, edu_type, content):
        position = _stream_row(conn, room_id, "ephemeral", None, now_ms)
        conn.execute(
            "INSERT OR REPLACE INTO ephemeral (room_id, edu_type, user_id, receipt_type, "
            "content_json, typing, stream_pos) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (room_id, edu_type, user_id, receipt_type, _dumps(row), int(typing), position),
        )
        written.append((user_id, position, typing))
    return written


def typing_now(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
    """(room ID, user ID, stream position) of every user whose latest ``m.typing`` says
    they are typing."""
    return [
        (str(r), str(u), int(p))
        for r, u, p in conn.execute(
            "SELECT room_id, user_id, stream_pos FROM ephemeral WHERE typing = 1 "
            "ORDER BY stream_pos"
        )
    ]


def stop_typing(
    conn: sqlite3.Connection, room_id: str, user_id: str, position: int, now_ms: int
) -> bool:
    """Store that ``user_id`` stopped typing in the room (the typing timeout ran out), if
    their latest ``m.typing`` row is still the typing one at stream position ``position``.
    Returns whether a row was written."""
    row = conn.execute(
        "SELECT stream_pos FROM ephemeral WHERE room_id = ? AND edu_type = 'm.typing' AND "
        "user_id = ? AND typing = 1",
        (room_id, user_id),
    ).fetchone()
    if row is None or int(row[0]) != position:
        return False
    save_ephemeral(conn, room_id, "m.typing", {"user_id": user_id, "typing": False}, now_ms)
    return True


def membership(conn: sqlite3.Connection, room_id: str, user_id: str) -> str | None:
    """The user's ``membership`` in the room's current state (``None``: no member event)."""
    content = state_content(conn, room_id, "m.room.member", user_id)
    value = content.get("membership") if content is not None else None
    return value if isinstance(value, str) else None


def set_device_peek(
    conn: sqlite3.Connection, user_id: str, device_id: str, room_id: str, state: str, now_ms: int
) -> int:
    """Record a device peek's state (``active``, ``dormant``, ``ended``); returns the stream
    position of the change."""
    position = _stream_row(conn, room_id, "device", None, now_ms)
    conn.execute(
        "INSERT INTO device_peeks (user_id, device_id, room_id, state, created_ts, changed_pos) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, device_id, room_id) DO UPDATE SET "
        "state = excluded.state, changed_pos = excluded.changed_pos",
        (user_id, device_id, room_id, state, now_ms, position),
    )
    return position


def device_peek_state(
    conn: sqlite3.Connection, user_id: str, device_id: str, room_id: str
) -> str | None:
    row = conn.execute(
        "SELECT state FROM device_peeks WHERE user_id = ? AND device_id = ? AND room_id = ?",
        (user_id, device_id, room_id),
    ).fetchone()
    return str(row[0]) if row else None


def device_peek_count(conn: sqlite3.Connection, room_id: str, state: str = "active") -> int:
    row = conn.execute(
        "SELECT COUNT(*) FROM device_peeks WHERE room_id = ? AND state = ?", (room_id, state)
    ).fetchone()
    return int(row[0])


def device_peeks_of_device(conn: sqlite3.Connection, user_id: str, device_id: str) -> int:
    row = conn.execute(
        "SELECT COUNT(*) FROM device_peeks WHERE user_id = ? AND device_id = ? AND "
        "state = 'active'",
        (user_id, device_id),
    ).fetchone()
    return int(row[0])


def end_room_peeks(conn: sqlite3.Connection, room_id: str, now_ms: int) -> int:
    """End every active or dormant device peek of a room; returns how many."""
    rows = conn.execute(
        "SELECT user_id, device_id FROM device_peeks WHERE room_id = ? AND state != 'ended'",
        (room_id,),
    ).fetchall()
    for user_id, device_id in rows:
        set_device_peek(conn, user_id, device_id, room_id, "ended", now_ms)
    return len(rows)


def stream_events(conn: sqlite3.Connection, room_id: str) -> list[tuple[int, str, str | None]]:
    """The room's stream: (position, kind, event ID) for events and gaps, in order."""
    return [
        (int(p), str(k), e)
        for p, k, e in conn.execute(
            "SELECT stream_pos, kind, event_id FROM room_stream WHERE room_id = ? AND "
            "kind IN ('event', 'gap') ORDER BY stream_pos",
            (room_id,),
        )
    ]


def event_pdu(conn: sqlite3.Connection, event_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT pdu_json FROM events WHERE event_id = ?", (event_id,)).fetchone()
    return json.loads(row[0]) if row else None


# -- sync ------------------------------------------------------------------------------------


def stream_changes(conn: sqlite3.Connection, after: int | None) -> tuple[list[StreamChange], int]:
    """The stream rows after position ``after``, oldest first, each with what the live
    window needs (PDU, EDU content, which device peek), and the newest position. With
    ``after=None``: no rows, just the newest position (where a live window starts)."""
    upto = max_stream_pos(conn)
    if after is None or upto <= after:
        return [], upto
    rows = conn.execute(
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
            for t, c, p in conn.execute(
                "SELECT edu_type, content_json, stream_pos FROM ephemeral WHERE stream_pos > ?",
                (after,),
            )
        }
    devices: dict[int, tuple[str, str, str]] = {}
    if "device" in kinds:
        devices = {
            int(p): (str(u), str(d), str(st))
            for u, d, st, p in conn.execute(
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


def max_stream_pos(conn: sqlite3.Connection) -> int:
    """The newest stream position (0 for an empty stream)."""
    row = conn.execute("SELECT MAX(stream_pos) FROM room_stream").fetchone()
    return int(row[0] or 0)


def device_peeks(
    conn: sqlite3.Connection, user_id: str, device_id: str
) -> list[tuple[str, str, int]]:
    """(room ID, state, changed position) of every peek the device ever made."""
    return [
        (str(r), str(s), int(p))
        for r, s, p in conn.execute(
            "SELECT room_id, state, changed_pos FROM device_peeks WHERE user_id = ? AND "
            "device_id = ? ORDER BY room_id",
            (user_id, device_id),
        )
    ]


def rooms_changed(conn: sqlite3.Connection, room_ids: Iterable[str], since: int, upto: int) -> bool:
    """Whether any of the rooms has stream items (events, gaps, EDUs) in (since, upto]."""
    ids = list(room_ids)
    if not ids:
        return False
    marks = ",".join("?" * len(ids))
    row = conn.execute(
        f"SELECT 1 FROM room_stream WHERE room_id IN ({marks}) AND stream_pos > ? AND "
        "stream_pos <= ? AND kind IN ('event', 'gap', 'ephemeral') LIMIT 1",
        [*ids, since, upto],
    ).fetchone()
    return row is not None


#: A ``room_stream`` condition: not a gap row that is closed with no events of its own
#: (nothing is missing there).
_NOT_AN_EMPTY_CLOSED_GAP = (
    " AND NOT (kind = 'gap' AND EXISTS (SELECT 1 FROM gap_fills f WHERE f.room_id = "
    "room_stream.room_id AND f.gap_pos = room_stream.stream_pos AND f.closed = 1 AND NOT "
    "EXISTS (SELECT 1 FROM gap_events g WHERE g.room_id = f.room_id AND g.gap_pos = "
    "f.gap_pos)))"
)


def room_view_rows(
    conn: sqlite3.Connection,
    room_id: str,
    since: int | None,
    upto: int,
    limit: int,
    ephemeral_since: int | None = None,
    *,
    afresh: bool = False,
) -> dict[str, Any]:
    """What the sync builder needs of one room, read in one go (see core/sync.py). The
    EDU rows are those after ``ephemeral_since`` (all when ``None``) plus the typing ones
    (see :class:`~peekproxy.core.sync.RoomView`).

    ``afresh``: the room is shown to the device as new (its first sync after a peek), so a
    gap marker over which nothing is missing (closed at once: the first view's history
    joined what was held) is left out; its timeline runs on past it, as on a join. A device
    that already has the room still meets it (decision 4: ``limited`` after a re-peek)."""
    floor = since if since is not None else upto
    rows = (
        "SELECT stream_pos, kind, event_id FROM room_stream WHERE room_id = ? AND "
        "kind IN ('event', 'gap')" + (_NOT_AN_EMPTY_CLOSED_GAP if afresh else "")
    )
    newer = conn.execute(
        rows + " AND stream_pos > ? AND stream_pos <= ? ORDER BY stream_pos",
        (room_id, floor, upto),
    ).fetchall()
    older = conn.execute(
        rows + " AND stream_pos <= ? ORDER BY stream_pos DESC LIMIT ?",
        (room_id, floor, limit + 2),
    ).fetchall()
    older.reverse()
    has_earlier = False
    if older:
        has_earlier = (
            conn.execute(rows + " AND stream_pos < ? LIMIT 1", (room_id, older[0][0])).fetchone()
            is not None
        )
    recent = [(int(p), str(k), e) for p, k, e in (*older, *newer)]
    state_ids = current_state_ids(conn, room_id)
    wanted = {e for _, _, e in recent if e} | set(state_ids.values())
    events: dict[str, Any] = {}
    redacted: set[str] = set()
    for event_id, pdu_json, is_redacted in select_in(
        conn, "SELECT event_id, pdu_json, redacted FROM events WHERE event_id IN ({marks})", wanted
    ):
        events[event_id] = json.loads(pdu_json)
        if is_redacted:
            redacted.add(event_id)
    # The EDU rows in the range (all of them for a room shown afresh), and the typing rows of
    # the users typing now: the m.typing event lists every user currently typing.
    edu_floor = -1 if ephemeral_since is None else ephemeral_since
    ephemeral = [
        (str(t), json.loads(c), int(p))
        for t, c, p in conn.execute(
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
        "room_version": room_version_of(conn, room_id),
    }


def sync_snapshot(
    conn: sqlite3.Connection,
    user_id: str,
    device_id: str,
    since: int | None,
    full_state: bool,
    limit: int,
) -> dict[str, Any]:
    """Everything one /sync needs, in one read: ``peeks`` (the device's
    :class:`~peekproxy.core.sync.DevicePeek` list), ``upto`` (the newest position),
    ``active`` (rooms with an active peek, sorted), ``changed`` (whether anything changed
    since ``since``) and, if so, ``views``: a :class:`~peekproxy.core.sync.RoomView` of
    each room to show."""
    peeks = [DevicePeek(r, s, p) for r, s, p in device_peeks(conn, user_id, device_id)]
    upto = max_stream_pos(conn)
    active = [peek.room_id for peek in peeks if peek.state == "active"]
    changed = since is None or full_state or any(peek.changed_pos > since for peek in peeks)
    if not changed:
        assert since is not None
        changed = rooms_changed(conn, active, since, upto)
    views: dict[str, RoomView] = {}
    if changed:
        for peek in peeks:
            if peek.state == "active" or (
                peek.state == "ended" and since is not None and since < peek.changed_pos <= upto
            ):
                shown_afresh = peek.state == "active" and (
                    since is None or peek.changed_pos > since
                )
                rows = room_view_rows(
                    conn,
                    peek.room_id,
                    since,
                    upto,
                    limit,
                    ephemeral_since=None if shown_afresh else since,
                    afresh=shown_afresh,
                )
                views[peek.room_id] = RoomView(
                    room_id=peek.room_id,
                    room_version=rows["room_version"],
                    recent=[StreamItem(p, k, e) for p, k, e in rows["recent"]],
                    has_earlier=rows["has_earlier"],
                    state_ids=rows["state_ids"],
                    events=rows["events"],
                    redacted=frozenset(rows["redacted"]),
                    ephemeral=rows["ephemeral"],
                )
    return {"peeks": peeks, "upto": upto, "active": active, "changed": changed, "views": views}

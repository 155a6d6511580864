"""What a room's stream takes in: the decisions behind the store's room-event writes.

Pure: plain values in, a decision out. A storage implementation (``store/sqlite/events.py``
today) reads the inputs with its own queries, calls these functions and writes what they
decide, so a second implementation (PostgreSQL, issue 16) follows the same rules by calling
them too.

The room stream and its gap rows are described in :mod:`peekproxy.core.paging`; a "depth" is
the PDU's ``depth`` field (an ``int``; anything else is not compared). "Held" means a client
sees the event when paging: it is on a room stream or in a gap's fetched events.
"""

from __future__ import annotations

import enum
from collections.abc import Container, Iterable
from typing import TypeGuard

__all__ = [
    "SnapshotGap",
    "SnapshotStep",
    "joins_stream_when_late",
    "not_yet_held",
    "older_than_newest",
    "snapshot_gap",
    "snapshot_step",
]


def older_than_newest(depth: object, newest_depth: int | None) -> TypeGuard[int]:
    """Whether an event of ``depth`` is older than the newest event on the room's stream
    (``newest_depth``; ``None`` for a stream with no event): a late event. A non-integer
    depth is never older (and, when older, ``depth`` is an ``int``)."""
    return isinstance(depth, int) and newest_depth is not None and depth < newest_depth


def joins_stream_when_late(depth: int, history_floor: int | None) -> bool:
    """Whether a late event (:func:`older_than_newest`) arriving by ``/send`` is appended to
    the room's stream: unless its depth is below the room's history floor
    (``RoomEventReads.history_floor``: where the stream resumes after its newest gap). History
    below the floor is what the gap stands for; an event from there is reached by paging
    (backfill), not shown as new."""
    return history_floor is None or depth >= history_floor


class SnapshotStep(enum.Enum):
    """What storing a peek's snapshot (``RoomEventWrites.store_snapshot``) does to the room."""

    #: The snapshot is older than what is held (its latest event is held but not the newest,
    #: or it is older than the newest event): it changes nothing (its events are stored).
    NOTHING = "nothing"
    #: The latest event is already the newest on the stream: only the current state is
    #: replaced by the snapshot's.
    STATE_ONLY = "state-only"
    #: The latest event is new: the state is replaced, the history before it and the latest
    #: event go on the stream (after a gap row when :func:`snapshot_gap` says so).
    APPEND = "append"


def snapshot_step(
    *,
    latest_held: bool,
    latest_is_newest: bool,
    latest_depth: object,
    newest_depth: int | None,
) -> SnapshotStep:
    """What storing a snapshot does (:class:`SnapshotStep`): an older snapshot changes nothing.

    Args:
        latest_held: the snapshot's latest event is already held (on a stream or in a gap).
        latest_is_newest: it is the newest event on the room's stream.
        latest_depth: its ``depth`` field as received.
        newest_depth: the depth of the newest event on the room's stream (``None``: none).
    """
    if latest_held:
        return SnapshotStep.STATE_ONLY if latest_is_newest else SnapshotStep.NOTHING
    if older_than_newest(latest_depth, newest_depth):
        return SnapshotStep.NOTHING
    return SnapshotStep.APPEND


class SnapshotGap(enum.Enum):
    """The gap row a stored snapshot puts before its history and latest event."""

    #: No gap row: nothing can be missing before it.
    NONE = "none"
    #: A gap row, open: history is missing there (paging asks for backfill).
    OPEN = "open"
    #: A gap row closed at once (decision 4): a re-peek is gappy for the sync (``limited``)
    #: even when the history it fetched joins what is held; closed, so paging runs through it.
    CLOSED = "closed"


def snapshot_gap(*, gap: bool, history_fetched: bool, history_complete: bool) -> SnapshotGap:
    """The gap row of a new snapshot (:attr:`SnapshotStep.APPEND`).

    Args:
        gap: the caller asks for a gap (a re-peek: events may have been missed).
        history_fetched: the snapshot carries the history fetched before its latest event.
        history_complete: that history joins what is held (or reaches ``m.room.create``).
    """
    if gap or (history_fetched and not history_complete):
        return SnapshotGap.CLOSED if history_fetched and history_complete else SnapshotGap.OPEN
    return SnapshotGap.NONE


def not_yet_held(event_ids: Iterable[str], held: Container[str]) -> list[str]:
    """The events of ``event_ids`` a client does not already see, in order, each once: those
    to put on the stream (a snapshot's history) or in a gap's fetched events (a backfill
    round). ``held``: which of them are held already (and whatever else)."""
    return [event_id for event_id in dict.fromkeys(event_ids) if event_id not in held]

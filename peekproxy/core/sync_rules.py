"""What a device's ``/sync`` snapshot holds (MSC2753 ``rooms.peek``): the decisions behind
``ReadTransaction.sync_snapshot``.

Pure: plain values in, a decision out. A storage implementation (``store/sqlite/sync.py``
today) reads the device's peeks and the rooms' stream rows with its own queries, calls these
functions and returns a :class:`~peekproxy.core.sync.SyncSnapshot` built from what they
decide, so a second implementation (PostgreSQL, issue 16) shows the same rooms the same way.
What the builder then makes of the views is :func:`peekproxy.core.sync.build_sync`, which
follows the same rules (it calls :func:`shown_in_sync` and :func:`shown_afresh`).

Positions are stream positions; ``since`` is the sync's ``since`` position (``None``: an
initial sync) and ``upto`` the newest position the snapshot sees.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # core/sync.py's builder calls these rules too: no import cycle at run time
    from peekproxy.core.sync import DevicePeek

__all__ = [
    "active_rooms",
    "peeks_changed",
    "quiet_from",
    "shown_afresh",
    "shown_in_sync",
]


def active_rooms(peeks: Iterable[DevicePeek]) -> list[str]:
    """The rooms of the ``active`` peeks, in the order given (the store lists a device's
    peeks by room ID, so sorted): what a waiting sync registers wake-ups for."""
    return [peek.room_id for peek in peeks if peek.state == "active"]


def peeks_changed(peeks: Iterable[DevicePeek], since: int | None, full_state: bool) -> bool:
    """Whether the sync has something to show without looking at the rooms: always on an
    initial sync or with ``full_state``, else when a peek changed state after ``since``.
    When not, the store looks for stream items of the active rooms in ``(since, upto]``."""
    return since is None or full_state or any(peek.changed_pos > since for peek in peeks)


def shown_in_sync(peek: DevicePeek, since: int | None, upto: int) -> bool:
    """Whether the snapshot has a view of the peek's room: an ``active`` peek always, an
    ``ended`` one once, in the first sync after it ended (``rooms.leave``, decisions 7 and
    10); a ``dormant`` one never (it is restored first, decision 9)."""
    if peek.state == "active":
        return True
    return peek.state == "ended" and since is not None and since < peek.changed_pos <= upto


def shown_afresh(peek: DevicePeek, since: int | None) -> bool:
    """Whether the room is new to the device: an ``active`` peek on an initial sync, or one
    that (re)started after ``since``. Such a view gets every EDU row up to ``upto`` (not only
    those after ``since``) and leaves out the gap rows closed with nothing missing over them
    (the store's query does: decision 4 keeps them for a device that already has the room)."""
    return peek.state == "active" and (since is None or peek.changed_pos > since)


#: Peek states that never show again: ``ended`` (its ``leave`` entry was due once, right
#: after it ended) and ``joined`` (never shown).
FINAL_STATES = frozenset({"ended", "joined"})


def quiet_from(peeks: Iterable[DevicePeek]) -> int | None:
    """The position from which the device's syncs show nothing until one of its peeks
    changes: ``0`` (any ``since``, and an initial sync) when it has no peek at all; the
    newest change of its peeks when every one has ended or was joined (an ``ended`` peek's
    ``leave`` entry is due to a ``since`` before that change only); ``None`` while one is
    ``active`` or ``dormant``. Stream positions start at 1."""
    floor = 0
    for peek in peeks:
        if peek.state not in FINAL_STATES:
            return None
        floor = max(floor, peek.changed_pos)
    return floor

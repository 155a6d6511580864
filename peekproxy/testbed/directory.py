"""The testbed's alias directory: room alias → room ID, following each room's
``m.room.canonical_alias`` state (``alias`` and ``alt_aliases`` of this server).

Plain functions over the directory mapping the :class:`~peekproxy.testbed.host.Testbed`
keeps (``Testbed.aliases``), so that it stays a ``dict`` callers can read and compare.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from peekproxy.api.errors import MatrixError
from peekproxy.testbed.rooms import TestbedRoom

__all__ = ["check_aliases_free", "index_aliases"]

log = logging.getLogger("peekproxy.testbed")


def check_aliases_free(
    directory: Mapping[str, str], room_id: str | None, aliases: list[str]
) -> None:
    """Refuse ``aliases`` when another room than ``room_id`` (``None``: a new room) holds one.

    Raises:
        MatrixError: 409 ``M_ROOM_IN_USE`` ``<alias> is taken by <room ID>``.
    """
    for alias in aliases:
        holder = directory.get(alias)
        if holder is not None and holder != room_id:
            raise MatrixError(409, "M_ROOM_IN_USE", f"{alias} is taken by {holder}")


def index_aliases(
    directory: dict[str, str], room: TestbedRoom, rooms: Mapping[str, TestbedRoom]
) -> None:
    """Point ``directory`` at ``room`` for exactly the aliases its current
    ``m.room.canonical_alias`` claims (``alias`` and ``alt_aliases``). ``rooms`` (room ID →
    room) settles a clash, which only rooms saved before claims were checked can have: the
    newer claim (the ``origin_server_ts`` of the canonical alias event) wins."""
    for alias in [a for a, held in directory.items() if held == room.room_id]:
        del directory[alias]
    for alias in room.local_aliases():
        holder = directory.get(alias)
        if holder is not None and holder != room.room_id:
            ours = _alias_claimed_at(room) >= _alias_claimed_at(rooms[holder])
            log.warning(
                "alias %s is claimed by %s and %s; keeping %s",
                alias,
                holder,
                room.room_id,
                room.room_id if ours else holder,
            )
            if not ours:
                continue
        directory[alias] = room.room_id


def _alias_claimed_at(room: TestbedRoom) -> int:
    event = room.state_event("m.room.canonical_alias")
    ts = None if event is None else event.get("origin_server_ts")
    return ts if isinstance(ts, int) else 0

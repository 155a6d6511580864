"""The read endpoints MSC2444 R4 opens for world_readable rooms (Server-Server API §Retrieving
events, §Backfilling and retrieving missing events), over the testbed's rooms.

Each read first checks that the requesting server may read the room
(:func:`~peekproxy.testbed.peek_rules.check_readable`); backfill and ``get_missing_events``
obey the injected :mod:`~peekproxy.testbed.faults`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import trio

from peekproxy.api.errors import MatrixError
from peekproxy.testbed.faults import Faults
from peekproxy.testbed.peek_rules import check_readable
from peekproxy.testbed.rooms import TestbedRoom

__all__ = ["RoomReads"]


class RoomReads:
    """Reads of ``rooms`` (room ID → room, the testbed's live mapping) for other servers."""

    def __init__(self, rooms: Mapping[str, TestbedRoom], faults: Faults) -> None:
        self.rooms = rooms
        self.faults = faults

    def readable_room(self, room_id: str, origin: str) -> TestbedRoom:
        """A room ``origin`` may read over federation: known (404), allowed by its server ACL
        (403) and world_readable (403)."""
        room = self.rooms.get(room_id)
        if room is None:
            raise MatrixError(404, "M_NOT_FOUND", f"unknown room {room_id}")
        check_readable(room, origin)
        return room

    def event(self, event_id: str, origin: str) -> dict[str, Any]:
        """The PDU ``event_id`` (of any room), when ``origin`` may read its room.

        Raises:
            MatrixError: 404 ``M_NOT_FOUND`` unknown event; 403 as :meth:`readable_room`.
        """
        for room in self.rooms.values():
            pdu = room.event(event_id)
            if pdu is not None:
                self.readable_room(room.room_id, origin)
                return pdu
        raise MatrixError(404, "M_NOT_FOUND", f"unknown event {event_id}")

    def event_auth(self, room: TestbedRoom, event_id: str) -> list[dict[str, Any]]:
        """The auth chain of ``event_id`` of ``room`` (SSAPI ``GET /event_auth``): every event
        reachable through ``auth_events``, the event itself not included.

        Raises:
            MatrixError: 404 ``M_NOT_FOUND`` unknown event; 404 ``M_UNRECOGNIZED`` while the
                ``event_auth_fail_next`` fault lasts (a server without the endpoint).
        """
        if self.faults.take("event_auth_fail_next"):
            raise MatrixError(404, "M_UNRECOGNIZED", "Unrecognized request")
        pdu = room.event(event_id)
        if pdu is None:
            raise MatrixError(404, "M_NOT_FOUND", f"unknown event {event_id}")
        return room.auth_chain([pdu])

    @staticmethod
    def at(room: TestbedRoom, event_id: str | None) -> str:
        """``event_id`` (default: the room's latest event), checked to be of ``room``.

        Raises:
            MatrixError: 404 ``M_NOT_FOUND`` unknown event.
        """
        event_id = event_id or room.latest()[0]
        if room.index_of(event_id) is None:
            raise MatrixError(404, "M_NOT_FOUND", f"unknown event {event_id}")
        return event_id

    def state(self, room: TestbedRoom, event_id: str | None) -> dict[str, Any]:
        """``GET /state``: ``{pdus, auth_chain}`` at ``event_id`` (see :meth:`at`)."""
        pdus = room.state_at(self.at(room, event_id))
        return {"pdus": pdus, "auth_chain": room.auth_chain(pdus)}

    def state_ids(self, room: TestbedRoom, event_id: str | None) -> dict[str, Any]:
        """``GET /state_ids``: ``{pdu_ids, auth_chain_ids}`` at ``event_id`` (see :meth:`at`)."""
        at = self.at(room, event_id)
        auth_ids = room.auth_chain_ids(room.state_at(at))
        return {"pdu_ids": room.state_ids_at(at), "auth_chain_ids": auth_ids}

    async def backfill(
        self, room: TestbedRoom, starts: list[str], limit: int
    ) -> list[dict[str, Any]]:
        """``GET /backfill``: up to ``limit`` PDUs back from ``starts``, after any injected
        delay.

        Raises:
            MatrixError: 400 ``M_INVALID_PARAM`` when ``starts`` names no event or one not of
                the room; 500 ``M_UNKNOWN`` an injected failure.
        """
        if not starts or any(room.index_of(e) is None for e in starts):
            raise MatrixError(400, "M_INVALID_PARAM", "v must name events of the room")
        if self.faults.backfill_delay_ms:
            await trio.sleep(self.faults.backfill_delay_ms / 1000)
        if self.faults.take("backfill_fail_next"):
            raise MatrixError(500, "M_UNKNOWN", "injected backfill failure")
        return room.backfill(starts, limit)

    def missing_events(
        self,
        room: TestbedRoom,
        earliest: Sequence[str],
        latest: Sequence[str],
        limit: int,
        min_depth: int,
    ) -> list[dict[str, Any]]:
        """``POST /get_missing_events``: see :meth:`TestbedRoom.missing_events`; none when
        an empty answer is injected."""
        if self.faults.take("missing_events_empty_next"):
            return []
        return room.missing_events(earliest, latest, limit, min_depth)

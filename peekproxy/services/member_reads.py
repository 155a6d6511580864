"""Reads other servers ask of a member: the rooms peekproxy is joined to as the observer.

When a room is followed by an observer join (docs/observer-join.md), peekproxy is one of the
room's servers, and the others may ask it what they ask any member (server-server API
§Retrieving events, §Backfilling and retrieving missing events, §Room State): an event, the
state before an event, history, missing events, an event's auth chain. :class:`MemberReads`
answers them from the store, as Synapse answers them (research §6 of issue 13), with the
rules of :mod:`peekproxy.core.member_reads`.

Only *observed* rooms are served: a room whose subscription takes events and is held by an
observer join (:meth:`peekproxy.services.subscriptions.Subscriptions.observed`). Every other room —
peeked by MSC2444, followed through the fronted homeserver's client API, left, unknown — is
``403 M_FORBIDDEN "Host not in room."``, as Synapse answers a server that is not in the room,
and an event of such a room asked by its ID alone (``/event``) is ``404 M_NOT_FOUND`` as an
unknown one is: nothing of a peeked room leaks, not even whether it is held. In an observed room the
asking server must have a joined member in the current state (else the same 403) and be let
in by the room's ``m.room.server_acl`` (else ``403 M_FORBIDDEN "Server is banned from
room"``; :func:`peekproxy.core.server_acl.server_allowed`).

Events are served as stored (:func:`peekproxy.core.member_reads.federation_pdu`). The store
keeps only the current state, so ``/state`` and ``/state_ids`` answer only where the state
before the event can be told exactly (:func:`peekproxy.core.member_reads.state_before`: e.g.
the newest event), else ``404 M_NOT_FOUND``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from peekproxy.core import member_reads as rules
from peekproxy.core.room_versions import RoomVersion, UnknownRoomVersion, room_version
from peekproxy.core.server_acl import server_allowed
from peekproxy.services.errors import PeekError
from peekproxy.services.subscriptions import Subscriptions
from peekproxy.store import ReadTransaction, Storage

__all__ = ["MAX_LATER_ROWS", "MemberReads", "RoomState"]

log = logging.getLogger("peekproxy.federation")

T = TypeVar("T")

#: ``/state`` looks at most this many stream rows after the event for state changes; an
#: older event's state is not told (404).
MAX_LATER_ROWS = 1000


def not_in_room() -> PeekError:
    """Synapse's answer to a server that is not in the room (``assert_host_in_room``)."""
    return PeekError(403, "M_FORBIDDEN", "Host not in room.")


@dataclass(frozen=True)
class RoomState:
    """The state before an event: its events and their auth chain, each as
    (event ID, served PDU), in a stable order."""

    state: list[tuple[str, dict[str, Any]]]
    auth_chain: list[tuple[str, dict[str, Any]]]


class _Room:
    """One observed room inside a read transaction: its stored events, looked up once."""

    def __init__(self, tx: ReadTransaction, room_id: str, rules_of_room: RoomVersion) -> None:
        self.tx, self.room_id, self.rules = tx, room_id, rules_of_room
        self._found: dict[str, tuple[dict[str, Any], bool] | None] = {}

    def lookup(self, event_id: str) -> Mapping[str, Any] | None:
        """The stored PDU of an event of this room (:data:`rules.Lookup`)."""
        if event_id not in self._found:
            self._found[event_id] = self.tx.read_event(self.room_id, event_id)
        found = self._found[event_id]
        return found[0] if found is not None else None

    def served(self, event_ids: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
        """(event ID, PDU as served) of the stored ones of ``event_ids``, in that order."""
        out = []
        for event_id in event_ids:
            if self.lookup(event_id) is None:
                continue
            found = self._found[event_id]
            assert found is not None
            pdu, redacted = found
            out.append((event_id, rules.federation_pdu(pdu, redacted=redacted, rules=self.rules)))
        return out

    def check_access(self, origin: str) -> None:
        """403 unless ``origin`` has a joined member and the room's server ACL lets it in
        (in that order, as Synapse: the ACL is not shown to servers not in the room)."""
        members = [
            (user_id, self.tx.membership(self.room_id, user_id))
            for kind, user_id in self.tx.current_state_ids(self.room_id)
            if kind == "m.room.member" and user_id.partition(":")[2] == origin
        ]
        if not rules.host_in_room(members, origin):
            raise not_in_room()
        acl = self.tx.state_content(self.room_id, "m.room.server_acl")
        if not server_allowed(acl, origin):
            raise PeekError(403, "M_FORBIDDEN", "Server is banned from room")


class MemberReads:
    """Answers other servers' reads of the rooms peekproxy observes (see the module
    docstring). Every method checks the room and the asking server first.

    Args:
        store: the rooms' stored events and current state.
        subscriptions: which rooms are followed, and how (observed: an observer join).
    """

    def __init__(self, *, store: Storage, subscriptions: Subscriptions) -> None:
        self.store = store
        self.subscriptions = subscriptions

    def observed_version(self, room_id: str) -> RoomVersion | None:
        """The room version of ``room_id`` when it is observed (joined as the observer, its
        events taken), else ``None``."""
        if not self.subscriptions.observed(room_id):
            return None
        try:
            return room_version(self.subscriptions.room_version_of(room_id) or "")
        except UnknownRoomVersion:
            return None

    async def _read(self, origin: str, room_id: str, fn: Callable[[_Room], T]) -> T:
        """``fn`` over the observed room, in one read transaction, once ``origin`` may read
        it; 403 (see :meth:`_Room.check_access`) otherwise."""
        version = self.observed_version(room_id)
        if version is None:
            log.info("member read of %s by %s refused: the room is not observed", room_id, origin)
            raise not_in_room()

        def read(tx: ReadTransaction) -> T:
            room = _Room(tx, room_id, version)
            room.check_access(origin)
            return fn(room)

        try:
            return await self.store.read(read)
        except PeekError as e:
            if e.status == 403:
                log.info("member read of %s by %s refused: %s", room_id, origin, e.error)
            raise

    async def event(self, origin: str, event_id: str) -> dict[str, Any]:
        """``GET /event/{eventId}``: the stored event as served.

        Raises:
            PeekError: 404 ``M_NOT_FOUND`` not stored, or stored for a room that is not
                observed (whether peekproxy holds it is not told); 403 as the module
                docstring says.
        """
        found = await self.store.read(lambda tx: tx.find_event(event_id))
        if found is None or self.observed_version(found[0]) is None:
            raise PeekError(404, "M_NOT_FOUND", f"Could not find event {event_id}")
        served = await self._read(origin, found[0], lambda room: room.served([event_id]))
        if not served:  # gone between the two reads: not this room's any more
            raise PeekError(404, "M_NOT_FOUND", f"Could not find event {event_id}")
        return served[0][1]

    async def state(self, origin: str, room_id: str, event_id: str) -> RoomState:
        """``GET /state`` and ``/state_ids``: the state before ``event_id`` and its auth
        chain (:func:`peekproxy.core.member_reads.state_before`).

        Raises:
            PeekError: 404 ``M_NOT_FOUND`` when the event is not stored in the room, or the
                state before it (or its auth chain) cannot be told from what is stored; 403.
        """

        def read(room: _Room) -> RoomState:
            pdu = room.lookup(event_id)
            if pdu is None:
                raise PeekError(404, "M_NOT_FOUND", f"Could not find event {event_id}")
            later = room.tx.stream_after(room_id, event_id, MAX_LATER_ROWS + 1)
            state = rules.state_before(
                event_id,
                pdu,
                later=later[:MAX_LATER_ROWS] if later is not None else None,
                later_complete=later is not None and len(later) <= MAX_LATER_ROWS,
                current=room.tx.current_state_ids(room_id),
                lookup=room.lookup,
            )
            if state is None:
                raise PeekError(
                    404,
                    "M_NOT_FOUND",
                    f"the state before {event_id} is not known here (peekproxy keeps only "
                    "the current state of the rooms it observes)",
                )
            ids = [state[key] for key in sorted(state)]
            chain, missing = rules.auth_chain_ids(ids, room.lookup)
            served = room.served(ids)
            if missing or len(served) < len(ids):
                raise PeekError(
                    404, "M_NOT_FOUND", f"the auth chain at {event_id} is not all stored here"
                )
            return RoomState(state=served, auth_chain=room.served(chain))

        return await self._read(origin, room_id, read)

    async def backfill(
        self, origin: str, room_id: str, starts: Sequence[str], limit: int
    ) -> list[dict[str, Any]]:
        """``GET /backfill``: stored PDUs back from ``starts``, newest first
        (:func:`peekproxy.core.member_reads.backfill_ids`). Raises: PeekError 403."""
        return await self._read(
            origin,
            room_id,
            lambda room: [
                pdu for _, pdu in room.served(rules.backfill_ids(starts, limit, room.lookup))
            ],
        )

    async def missing_events(
        self,
        origin: str,
        room_id: str,
        *,
        earliest: Sequence[str],
        latest: Sequence[str],
        limit: int,
        min_depth: int,
    ) -> list[dict[str, Any]]:
        """``POST /get_missing_events``: stored PDUs between ``earliest`` and ``latest``,
        oldest first (:func:`peekproxy.core.member_reads.missing_event_ids`).
        Raises: PeekError 403."""
        return await self._read(
            origin,
            room_id,
            lambda room: [
                pdu
                for _, pdu in room.served(
                    rules.missing_event_ids(earliest, latest, limit, min_depth, room.lookup)
                )
            ],
        )

    async def event_auth(self, origin: str, room_id: str, event_id: str) -> list[dict[str, Any]]:
        """``GET /event_auth``: the auth chain of a stored event of the room.

        Raises:
            PeekError: 404 ``M_NOT_FOUND`` when the event, or part of its chain, is not
                stored; 403.
        """

        def read(room: _Room) -> list[dict[str, Any]]:
            if room.lookup(event_id) is None:
                raise PeekError(404, "M_NOT_FOUND", f"Could not find event {event_id}")
            chain, missing = rules.auth_chain_ids([event_id], room.lookup)
            if missing:
                raise PeekError(
                    404, "M_NOT_FOUND", f"the auth chain of {event_id} is not all stored here"
                )
            return [pdu for _, pdu in room.served(chain)]

        return await self._read(origin, room_id, read)

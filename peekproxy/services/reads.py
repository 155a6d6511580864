"""History reads of peeked rooms: ``/messages`` (with remote backfill), ``/state``, ``/event``.

:class:`HistoryReads` answers the delegation API's read endpoints (and the MSC2753 client
endpoints in front mode) with client events (client-server API §Room Events): it pages
through a room's stored history (the rules are in :mod:`peekproxy.core.paging`), and when
a backward page meets a gap it runs one ``/backfill`` round at the server the room is
followed through (server-server API §Backfilling; every fetched PDU is checked like a
``/send`` PDU by :func:`peekproxy.services.backfill.fill_gap`) and reads the page again.
Failures the client should see are :class:`peekproxy.services.errors.PeekError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peekproxy.core import paging
from peekproxy.federation.client import FederationClient
from peekproxy.federation.keyring import Keyring
from peekproxy.services import backfill
from peekproxy.services.errors import PeekError
from peekproxy.services.event_auth import EventAuth
from peekproxy.store import ReadTransaction, Storage

__all__ = ["HistoryReads", "Messages"]


@dataclass(frozen=True)
class Messages:
    """One ``/messages`` page: client events in page order (newest first for ``dir=b``),
    the ``start`` token and the ``end`` token (``None``: nothing more in that direction)."""

    chunk: list[dict[str, Any]]
    start: str
    end: str | None


class HistoryReads:
    """Reads of the rooms devices peek (see the module docstring).

    Args:
        store: the rooms' stored history, state and device peeks.
        client: asks the remote server for ``/backfill``.
        keyring: the keys of the servers that signed backfilled PDUs.
        server_of: the server a room is followed through (its remote peek's server), or
            ``None`` when it is not followed now: gaps are then passed over, not filled.
        clock_ms: the wall clock in ms since the epoch (for ``unsigned.age``): the daemon's
            one clock, as the peek service's.
    """

    def __init__(
        self,
        *,
        store: Storage,
        client: FederationClient,
        keyring: Keyring,
        auth: EventAuth,
        server_of: Callable[[str], str | None],
        clock_ms: Callable[[], int],
    ) -> None:
        self.store = store
        self.auth = auth
        self.client = client
        self.keyring = keyring
        self.server_of = server_of
        self.clock_ms = clock_ms

    async def is_peeking(self, user_id: str, device_id: str, room_id: str) -> bool:
        """Whether the device has an active peek of the room (MSC2753: reads need one)."""
        return await self.store.read(lambda tx: tx.device_is_peeking(user_id, device_id, room_id))

    async def messages(
        self,
        room_id: str,
        *,
        from_point: paging.Point | None,
        to_point: paging.Point | None,
        direction: paging.Direction,
        limit: int,
    ) -> Messages:
        """One page of the room's history (client-server API §GET /rooms/{roomId}/messages).

        A backward page that meets a gap before any event runs one backfill round, stored
        keyed to the gap, and is read again; a server that refuses, or has nothing more, lets
        the page pass over the hole (it stays for a later page).

        Args:
            from_point / to_point: the ``from`` / ``to`` tokens' points (``None``: the
                stream's head for ``dir=b``, the start of the history for ``dir=f``; no end).
            direction: ``"b"`` (older first) or ``"f"``.
            limit: most events in the page (1-100).

        Raises:
            PeekError: 400 ``M_INVALID_PARAM`` for a ``from`` token past the stream's head;
                502 ``M_UNKNOWN`` when the server to backfill from cannot be asked now (the
                client asks again with the same token).
        """
        server = self.server_of(room_id)

        def read(fill_gaps: bool) -> Callable[[ReadTransaction], paging.Page]:
            return lambda tx: tx.read_page(
                room_id,
                from_point=from_point,
                to_point=to_point,
                direction=direction,
                limit=limit,
                fill_gaps=fill_gaps,
            )

        try:
            page = await self.store.read(read(direction == "b" and server is not None))
        except paging.TokenAhead:
            token = from_point.token() if from_point is not None else None
            raise PeekError(
                400, "M_INVALID_PARAM", f"from token {token!r} is from the future"
            ) from None
        if page.backfill is not None and server is not None:
            # One backfill round, stored keyed to the gap; then the page again. A server that
            # cannot be asked now: 502, the client asks again with the same token. One that
            # refuses, or has nothing more: the page passes over the hole (it stays).
            where = page.backfill
            try:
                helped = await backfill.fill_gap(
                    self.store,
                    self.client,
                    self.keyring,
                    self.auth,
                    server=server,
                    room_id=room_id,
                    version=page.room_version,
                    gap_pos=where.gap_pos,
                    anchor=where.anchor,
                    room_left=where.room_left,
                )
            except backfill.BackfillFailed as e:
                if e.retryable:
                    raise PeekError(
                        502, "M_UNKNOWN", f"could not fetch the history of {room_id}: {e.reason}"
                    ) from None
                helped = False
            page = await self.store.read(read(helped))
            if page.backfill is not None:
                page = await self.store.read(read(False))
        now = self.clock_ms()
        chunk = [
            paging.shown_event(
                pdu, event_id, redacted=r, room_id=room_id, version=page.room_version, now_ms=now
            )
            for event_id, pdu, r in page.events
        ]
        end = page.end.token() if page.end is not None else None
        return Messages(chunk=chunk, start=page.start.token(), end=end)

    async def state(self, room_id: str) -> list[dict[str, Any]]:
        """The room's current state as stored, as client events (client-server API
        §GET /rooms/{roomId}/state)."""
        rows = await self.store.read(lambda tx: tx.read_state(room_id))
        version = await self.store.read(lambda tx: tx.room_version_of(room_id))
        now = self.clock_ms()
        return [
            paging.shown_event(
                pdu, event_id, redacted=r, room_id=room_id, version=version, now_ms=now
            )
            for event_id, pdu, r in rows
        ]

    async def event(self, room_id: str, event_id: str) -> dict[str, Any]:
        """One stored event of the room as a client event (client-server API
        §GET /rooms/{roomId}/event/{eventId}).

        Raises:
            PeekError: 404 ``M_NOT_FOUND`` when the room has no such event stored.
        """
        found = await self.store.read(lambda tx: tx.read_event(room_id, event_id))
        if found is None:
            raise PeekError(404, "M_NOT_FOUND", f"event {event_id} not found in {room_id}")
        version = await self.store.read(lambda tx: tx.room_version_of(room_id))
        pdu, redacted = found
        return paging.shown_event(
            pdu,
            event_id,
            redacted=redacted,
            room_id=room_id,
            version=version,
            now_ms=self.clock_ms(),
        )

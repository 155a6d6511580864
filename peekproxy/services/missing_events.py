"""Fetching what received PDUs refer to: their signers' keys, the ``prev_events`` we
lack (SSAPI ``POST /_matrix/federation/v1/get_missing_events/{roomId}``) and the auth events
we lack (SSAPI ``GET /_matrix/federation/v1/event_auth/{roomId}/{eventId}``, else
``GET /_matrix/federation/v1/event/{eventId}`` one by one).

Used by ``/send`` ingest (:mod:`peekproxy.services.ingest`) and by a full MSC2444 renewal
reply that is ahead of the stored room (:mod:`peekproxy.services.msc2444`).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import trio

from peekproxy.core.events import event_refs, in_room
from peekproxy.core.pdu import check_pdu
from peekproxy.core.room_versions import RoomVersion, UnknownRoomVersion, room_version
from peekproxy.federation.client import FederationClient, FederationError, path_segment
from peekproxy.federation.keyring import Keyring
from peekproxy.store import Storage

__all__ = [
    "MISSING_EVENTS_LIMIT",
    "MISSING_EVENTS_MAX",
    "MISSING_EVENTS_TIMEOUT_S",
    "MissingEvents",
]

log = logging.getLogger("peekproxy.peeks")

#: Events asked for per ``get_missing_events`` round, and at most this many rounds' worth
#: in one fill (of one room in one ``/send``, or of one renewal reply).
MISSING_EVENTS_LIMIT = 20
MISSING_EVENTS_MAX = 200
#: One fill (all its rounds together) may take this long, in seconds.
MISSING_EVENTS_TIMEOUT_S = 10.0


class MissingEvents:
    """Signer keys and missing ancestors of received PDUs, verified like ``/send`` PDUs."""

    def __init__(self, *, store: Storage, client: FederationClient, keyring: Keyring) -> None:
        self.store = store
        self.client = client
        self.keyring = keyring

    async def signer_keys(self, pdus: Iterable[Mapping[str, Any]], version: str) -> None:
        """Fetch the keys of the servers that signed ``pdus`` (a room of ``version``) into
        the keyring; problems are logged, not raised (the PDU checks then reject)."""
        try:
            rules = room_version(version)
        except UnknownRoomVersion:
            return
        for problem in await self.keyring.fetch_signer_keys(pdus, rules):
            log.info("keys for PDUs: %s", problem)

    async def auth_chain(
        self,
        server: str,
        room_id: str,
        event_id: str,
        lacking: Iterable[str],
        rules: RoomVersion,
        *,
        known: Collection[str],
        max_requests: int,
    ) -> tuple[list[tuple[str, dict[str, Any], bool]], int]:
        """The auth events of ``event_id`` we lack, from ``server``: its whole auth chain
        (SSAPI ``GET /event_auth``), or, when the server cannot answer that, each of
        ``lacking`` and then their own auth events not in ``known`` one by one (SSAPI
        ``GET /event/{eventId}``), ``max_requests`` requests at most, answered or not.
        Returns (event ID, PDU, redacted) of the PDUs of ``room_id`` that pass receipt
        checks 1-3, unordered (a failure, logged, gives what passed so far), and how many
        requests were sent. The caller bounds the time."""
        path = f"/_matrix/federation/v1/event_auth/{path_segment(room_id)}/{path_segment(event_id)}"
        try:
            answer = await self.client.get_json(server, path, timeout=MISSING_EVENTS_TIMEOUT_S)
            chain = answer.get("auth_chain") if isinstance(answer, dict) else None
        except (FederationError, ValueError) as e:
            log.info("no auth chain of %s from %s (%s): asking for its events", event_id, server, e)
            chain = None
        if isinstance(chain, list):
            return await self._checked(chain, room_id, rules), 1
        found: dict[str, tuple[str, dict[str, Any], bool]] = {}
        todo = list(dict.fromkeys(lacking))
        asked = 1
        while todo and asked < max_requests:
            wanted = todo.pop(0)
            asked += 1
            try:
                answer = await self.client.get_json(
                    server,
                    f"/_matrix/federation/v1/event/{path_segment(wanted)}",
                    timeout=MISSING_EVENTS_TIMEOUT_S,
                )
            except (FederationError, ValueError) as e:
                log.info("could not fetch auth event %s from %s: %s", wanted, server, e)
                continue
            pdus = answer.get("pdus") if isinstance(answer, dict) else None
            for item in await self._checked(pdus if isinstance(pdus, list) else [], room_id, rules):
                if item[0] == wanted and wanted not in found:
                    found[wanted] = item
                    todo += [
                        a
                        for a in event_refs(item[1].get("auth_events"))
                        if a not in known and a not in found and a not in todo
                    ]
        return list(found.values()), asked

    async def _checked(
        self, pdus: list[Any], room_id: str, rules: RoomVersion
    ) -> list[tuple[str, dict[str, Any], bool]]:
        """(event ID, PDU, redacted) of the PDUs of ``room_id`` among ``pdus`` that pass
        receipt checks 1-3 (their signers' keys fetched first), each ID once."""
        await self.signer_keys([p for p in pdus if isinstance(p, dict)], rules.identifier)
        found = {}
        for pdu in pdus:
            verdict = check_pdu(pdu, rules, self.keyring.lookup)
            if verdict.pdu is None or verdict.event_id is None:
                continue
            if in_room(verdict.pdu, room_id, rules):
                found[verdict.event_id] = (
                    verdict.event_id,
                    verdict.pdu,
                    verdict.outcome == "redact",
                )
        return list(found.values())

    async def fetch(
        self,
        server: str,
        room_id: str,
        latest: list[str],
        rules: Any,
        *,
        known: set[str],
    ) -> list[tuple[str, dict[str, Any], bool]]:
        """Fetch the ancestors of ``latest`` that are not in ``known`` from ``server``
        (SSAPI ``POST /get_missing_events``, :data:`MISSING_EVENTS_LIMIT` a round, again
        from the oldest ones found while their ``prev_events`` are unknown): at most
        :data:`MISSING_EVENTS_MAX` events within :data:`MISSING_EVENTS_TIMEOUT_S` seconds.
        Returns (event ID, PDU, redacted) of the verified ones, unordered; a failure
        returns what was found so far."""
        earliest = await self.store.read(lambda tx: tx.newest_event_ids(room_id, 10))
        known = set(known)
        found: dict[str, tuple[str, dict[str, Any], bool]] = {}
        frontier = list(latest)
        path = f"/_matrix/federation/v1/get_missing_events/{path_segment(room_id)}"
        with trio.move_on_after(MISSING_EVENTS_TIMEOUT_S) as scope:
            while frontier and len(found) < MISSING_EVENTS_MAX:
                try:
                    answer = await self.client.post_json(
                        server,
                        path,
                        {
                            "earliest_events": earliest,
                            "latest_events": frontier,
                            "limit": min(MISSING_EVENTS_LIMIT, MISSING_EVENTS_MAX - len(found)),
                            "min_depth": 0,
                        },
                        timeout=MISSING_EVENTS_TIMEOUT_S,
                    )
                except FederationError as e:
                    log.info("could not fetch events missing in %s from %s: %s", room_id, server, e)
                    break
                events = answer.get("events") if isinstance(answer, dict) else None
                if not isinstance(events, list):
                    break
                await self.signer_keys(events, rules.identifier)
                new = []
                for pdu in events:
                    verdict = check_pdu(pdu, rules, self.keyring.lookup)
                    if (
                        verdict.outcome == "reject"
                        or verdict.pdu is None
                        or verdict.event_id is None
                    ):
                        continue
                    if verdict.pdu.get("room_id") != room_id or verdict.event_id in known:
                        continue
                    if verdict.event_id not in found:
                        found[verdict.event_id] = (
                            verdict.event_id,
                            verdict.pdu,
                            verdict.outcome == "redact",
                        )
                        new.append(verdict.event_id)
                if not new:
                    break
                # Go on from the events found whose parents are still neither held nor found.
                refs = {p for e in new for p in event_refs(found[e][1].get("prev_events"))}
                refs -= found.keys() | known
                known |= await self.store.read(lambda tx: tx.known_event_ids(refs))  # noqa: B023
                frontier = [
                    e
                    for e in new
                    if any(
                        p not in known and p not in found
                        for p in event_refs(found[e][1].get("prev_events"))
                    )
                ]
        if scope.cancelled_caught:
            log.info("fetching events missing in %s from %s timed out", room_id, server)
        return list(found.values())

"""The testbed's state and behaviour: :class:`Testbed`, the room host the HTTP apps serve.

It holds the rooms (:mod:`~peekproxy.testbed.rooms`) and their alias directory
(:mod:`~peekproxy.testbed.directory`), keeps them in the data directory
(:mod:`~peekproxy.testbed.files`), signs events for its own users and for simulated remote
servers, answers MSC2444 peeks (:mod:`~peekproxy.testbed.peek_rules`,
:mod:`~peekproxy.testbed.peeks`) and pushes every new event and EDU to the peekers
(:mod:`~peekproxy.testbed.sender`), with injected :mod:`~peekproxy.testbed.faults`. Other
servers read its rooms through :attr:`Testbed.reads` (:mod:`~peekproxy.testbed.reads`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from signedjson.types import SigningKey

from peekproxy.api.errors import MatrixError
from peekproxy.core.identifiers import InvalidIdentifier, RoomAlias, ServerName
from peekproxy.federation.client import FederationClient
from peekproxy.federation.keyring import Keyring
from peekproxy.testbed.config import TestbedConfig
from peekproxy.testbed.directory import check_aliases_free, index_aliases
from peekproxy.testbed.faults import Faults
from peekproxy.testbed.files import (
    load_or_create_key,
    load_remote_keys,
    load_saved_rooms,
    save_room,
)
from peekproxy.testbed.illegal import make_illegal
from peekproxy.testbed.peek_rules import (
    PEEK_REQUESTS_KEPT,
    PeekRequest,
    TokenBucket,
    check_peekable,
    end_peeks_after,
)
from peekproxy.testbed.peeks import PeekRegistry
from peekproxy.testbed.reads import RoomReads
from peekproxy.testbed.rooms import (
    SUPPORTED_ROOM_VERSIONS,
    RoomError,
    TestbedRoom,
    canonical_aliases,
)
from peekproxy.testbed.sender import DestinationSender
from peekproxy.testbed.users import any_user_id, local_user_id, remote_user_id

__all__ = ["NOT_STATE", "Testbed", "now_ms"]

log = logging.getLogger("peekproxy.testbed")


def now_ms() -> int:
    """The wall clock, in ms since the Unix epoch."""
    return int(time.time() * 1000)


#: State the admin API does not set directly, and what to do instead.
NOT_STATE = {
    "m.room.member": "m.room.member events are not set as state here; use "
    "POST /rooms/{roomId}/members/join, /leave or /invite",
    "m.room.create": "the m.room.create event is made with the room; set room_version "
    "and creator when creating it",
}


class Testbed:
    """The testbed's state and behaviour; the HTTP apps are thin layers over it."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        config: TestbedConfig,
        signing_key: SigningKey,
        client: FederationClient,
        keyring: Keyring,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.config = config
        self.server_name = config.server.server_name
        self.signing_key = signing_key
        self.client = client
        self.keyring = keyring
        self.clock_ms = clock_ms
        self.rooms: dict[str, TestbedRoom] = {}
        self.aliases: dict[str, str] = {}
        self.peeks = PeekRegistry()
        self.faults = Faults()
        #: The read endpoints of MSC2444 R4 over :attr:`rooms`.
        self.reads = RoomReads(self.rooms, self.faults)
        self.renewal_interval_ms = int(config.peeks.renewal_interval * 1000)
        self.senders: dict[str, DestinationSender] = {}
        self.nursery: trio.Nursery | None = None
        #: Simulated remote servers (server name → signing key): their users may join and
        #: send here as if their events had come over federation. Kept in
        #: ``<data_dir>/remote_keys/<server>.key``.
        self.remote_keys: dict[str, SigningKey] = {}
        #: Every peek request handled: (action, origin, room_id, peek_id), action being
        #: "start", "renew" (re-PUT or R4), "delete", "expire" (admin) or "end".
        self.peek_log: list[tuple[str, str, str, str]] = []
        #: Every authenticated peek request and its status, failures included (the newest
        #: ``PEEK_REQUESTS_KEPT``): what a peeker really sent, e.g. while faults are injected.
        self.peek_requests: deque[PeekRequest] = deque(maxlen=PEEK_REQUESTS_KEPT)
        self._activity = trio.Event()
        self._rate = TokenBucket(
            config.peeks.rate_limit_per_second, config.peeks.rate_limit_burst, time.monotonic
        )

    def _record(self, action: str, origin: str, room_id: str, peek_id: str) -> None:
        self.peek_log.append((action, origin, room_id, peek_id))
        self._activity.set()
        self._activity = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        """Wait (at most ``timeout`` s) until ``predicate()`` holds; it is re-checked after
        every peek request, event and delivered transaction."""
        with trio.fail_after(timeout):
            while not predicate():
                await self._activity.wait()

    def poke(self) -> None:
        """Wake :meth:`wait_until` callers (after a delivered transaction, say)."""
        self._activity.set()
        self._activity = trio.Event()

    # -- persistence and simulated remote servers ---------------------------------------------

    @property
    def rooms_dir(self) -> Path:
        return self.config.server.data_dir / "rooms"

    @property
    def remote_keys_dir(self) -> Path:
        return self.config.server.data_dir / "remote_keys"

    def add_remote_server(self, server_name: str) -> SigningKey:
        """Simulate another server's users here: its signing key (made once, kept in
        ``remote_keys/``). Whoever checks their events must be able to fetch that key from
        ``server_name`` (the test or operator serves it; see ``server_key_document``).

        Raises:
            MatrixError: 400 ``M_INVALID_PARAM``: not a server name, or this testbed's own.
        """
        try:
            ServerName.parse(server_name)
        except InvalidIdentifier as e:
            raise MatrixError(400, "M_INVALID_PARAM", f"server_name: {e}") from None
        if server_name == self.server_name or "/" in server_name:
            raise MatrixError(400, "M_INVALID_PARAM", f"{server_name!r} is not a remote server")
        key = self.remote_keys.get(server_name)
        if key is None:
            self.remote_keys_dir.mkdir(parents=True, exist_ok=True)
            key = load_or_create_key(self.remote_keys_dir / f"{server_name}.key")
            self.remote_keys[server_name] = key
        return key

    def _signer_of(self, user_id: str) -> tuple[str, SigningKey]:
        """(full user ID, signing key) for a local user or a simulated remote server's user."""
        server = user_id.partition(":")[2] if user_id.startswith("@") else ""
        key = self.remote_keys.get(server)
        if key is not None:
            return remote_user_id(user_id), key
        return local_user_id(self.server_name, user_id), self.signing_key

    def load_rooms(self) -> int:
        """Load rooms saved in ``<data_dir>/rooms``; returns how many. They are kept in
        creation order (the create event's ``origin_server_ts``, then the room ID), and the
        alias directory is rebuilt from their ``m.room.canonical_alias`` state.

        Raises:
            ServingError: ``<file>: <problem>`` for a file that cannot be read, is not JSON,
                fails the room checks (content hashes, signatures by this testbed's key, the
                DAG), belongs to another server name, or repeats a room of another file.
        """
        self.remote_keys.update(load_remote_keys(self.remote_keys_dir))
        for room in load_saved_rooms(
            self.rooms_dir,
            server_name=self.server_name,
            signing_key=self.signing_key,
            remote_keys=self.remote_keys,
        ):
            self.rooms[room.room_id] = room
            index_aliases(self.aliases, room, self.rooms)
        return len(self.rooms)

    def _save(self, room: TestbedRoom) -> None:
        save_room(self.rooms_dir, room)

    # -- rooms ---------------------------------------------------------------------------------

    def room(self, room_id: str) -> TestbedRoom:
        """The room with that ID, or (admin convenience) that alias in the directory.

        Raises:
            MatrixError: 404 ``M_NOT_FOUND``.
        """
        room = self.rooms.get(room_id) or self.rooms.get(self.aliases.get(room_id, ""))
        if room is None:
            raise MatrixError(404, "M_NOT_FOUND", f"unknown room {room_id}")
        return room

    def create_room(
        self,
        *,
        room_version: str,
        creator: str,
        alias: str | None,
        history_visibility: str,
        join_rule: str,
        encrypted: bool,
        name: str | None,
        topic: str | None,
        initial_state: list[dict[str, Any]],
    ) -> TestbedRoom:
        """Create a room (see :meth:`TestbedRoom.create`) and register it and its aliases.

        Raises:
            MatrixError: 400 ``M_UNSUPPORTED_ROOM_VERSION``; 400 ``M_INVALID_PARAM`` for a
                bad alias, user, value or ``initial_state`` item (``m.room.member`` and
                ``m.room.create`` are refused there); 409 ``M_ROOM_IN_USE`` when an alias
                the room would claim is held by another room.
        """
        if room_version not in SUPPORTED_ROOM_VERSIONS:
            raise MatrixError(
                400,
                "M_UNSUPPORTED_ROOM_VERSION",
                f"the testbed hosts room versions {', '.join(SUPPORTED_ROOM_VERSIONS)}",
            )
        full_alias = None
        if alias:
            full_alias = alias if alias.startswith("#") else f"#{alias}:{self.server_name}"
            try:
                parsed = RoomAlias.parse(full_alias)
            except InvalidIdentifier as e:
                raise MatrixError(400, "M_INVALID_PARAM", f"bad alias: {e}") from None
            if str(parsed.server_name) != self.server_name:
                raise MatrixError(400, "M_INVALID_PARAM", f"{full_alias} is not on this server")
            check_aliases_free(self.aliases, None, [full_alias])
        for number, item in enumerate(initial_state):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind in NOT_STATE:
                raise MatrixError(
                    400, "M_INVALID_PARAM", f"initial_state[{number}]: {NOT_STATE[kind]}"
                )
        try:
            room = TestbedRoom.create(
                server_name=self.server_name,
                signing_key=self.signing_key,
                room_version=room_version,
                creator=local_user_id(self.server_name, creator),
                now_ms=self.clock_ms(),
                history_visibility=history_visibility,
                join_rule=join_rule,
                alias=full_alias,
                name=name,
                topic=topic,
                encrypted=encrypted,
                initial_state=initial_state,
            )
        except RoomError as e:
            raise MatrixError(400, "M_INVALID_PARAM", str(e)) from None
        if room.room_id in self.rooms:  # v12 IDs are hashes: same creator, same millisecond
            raise MatrixError(409, "M_ROOM_IN_USE", f"room {room.room_id} exists; retry")
        for pdu in room.events:  # the alias and any canonical_alias of initial_state
            if (pdu["type"], pdu.get("state_key")) == ("m.room.canonical_alias", ""):
                claimed = canonical_aliases(pdu["content"], self.server_name)
                check_aliases_free(self.aliases, None, claimed)
        self.rooms[room.room_id] = room
        index_aliases(self.aliases, room, self.rooms)
        self._save(room)
        log.info(
            "created room %s (version %s, %s)",
            room.room_id,
            room_version,
            ", ".join(room.local_aliases()) or "no alias",
        )
        return room

    def send(
        self,
        room_id: str,
        *,
        sender: str,
        type: str,
        content: dict[str, Any],
        state_key: str | None = None,
    ) -> str:
        """Create, sign and store an event, then push it to the room's peekers.

        Raises:
            MatrixError: 404 unknown room; 400 ``M_INVALID_PARAM`` for an event the room
                model refuses; 409 ``M_ROOM_IN_USE`` for an ``m.room.canonical_alias`` that
                claims an alias another room holds.
        """
        room = self.room(room_id)
        if (type, state_key) == ("m.room.canonical_alias", "") and isinstance(content, dict):
            try:
                claimed = canonical_aliases(content, self.server_name)
            except RoomError as e:
                raise MatrixError(400, "M_INVALID_PARAM", str(e)) from None
            check_aliases_free(self.aliases, room.room_id, claimed)
        try:
            event_id, pdu = room.send(
                self.signing_key,
                sender=local_user_id(self.server_name, sender),
                type=type,
                content=content,
                now_ms=self.clock_ms(),
                state_key=state_key,
            )
        except RoomError as e:
            raise MatrixError(400, "M_INVALID_PARAM", str(e)) from None
        self._after_event(room, event_id, pdu)
        return event_id

    def membership(
        self, room_id: str, user: str, membership: str, *, sender: str | None = None
    ) -> str:
        """``user`` joins or leaves, or ``sender`` (default ``admin``) invites them. A user
        of a simulated remote server (:meth:`add_remote_server`) joins and leaves with that
        server's signature.

        Raises:
            MatrixError: 404 unknown room or membership; 400 ``M_INVALID_PARAM``.
        """
        room = self.room(room_id)
        target, key = self._signer_of(user)
        origin = target.partition(":")[2]
        now = self.clock_ms()
        try:
            if membership == "join":
                event_id, pdu = room.join(key, target, now, origin=origin)
            elif membership == "leave":
                event_id, pdu = room.leave(key, target, now, origin=origin)
            elif membership == "invite":
                event_id, pdu = room.send(
                    self.signing_key,
                    sender=local_user_id(self.server_name, sender or "admin"),
                    type="m.room.member",
                    state_key=target,
                    content={"membership": "invite"},
                    now_ms=now,
                )
            else:
                raise MatrixError(
                    404, "M_UNRECOGNIZED", f"membership {membership!r}: use join, leave or invite"
                )
        except RoomError as e:
            raise MatrixError(400, "M_INVALID_PARAM", str(e)) from None
        self._after_event(room, event_id, pdu)
        return event_id

    def relay_illegal(
        self, room_id: str, kind: str, *, sender: str | None, target: str | None
    ) -> tuple[str, str]:
        """With the ``relay_illegal`` fault on, make an event the authorization rules reject
        (:func:`~peekproxy.testbed.illegal.make_illegal`; ``sender`` a localpart or user ID
        of this server, by default ``mallory`` for ``non_member_message`` and ``admin``
        otherwise), keep it in the room's DAG and push it to the room's peekers. Returns
        ``(event_id, reason)``.

        Raises:
            MatrixError: 403 ``M_FORBIDDEN`` the fault is off; 404 unknown room; 400
                ``M_INVALID_PARAM`` a bad kind, user or target, or an event the rules allow.
        """
        if not self.faults.relay_illegal:
            raise MatrixError(403, "M_FORBIDDEN", "the relay_illegal fault is off (PUT /faults)")
        room = self.room(room_id)
        default = "mallory" if kind == "non_member_message" else "admin"
        try:
            event_id, pdu, reason = make_illegal(
                room,
                self.signing_key,
                kind=kind,
                sender=local_user_id(self.server_name, sender or default),
                target=None if target is None else any_user_id(self.server_name, target),
                now_ms=self.clock_ms(),
            )
        except RoomError as e:
            raise MatrixError(400, "M_INVALID_PARAM", str(e)) from None
        self._save(room)
        self._push(room, event_id, pdu)
        log.warning("relayed an illegal event %s (%s) in %s: %s", event_id, kind, room_id, reason)
        return event_id, reason

    def _push(self, room: TestbedRoom, event_id: str, pdu: dict[str, Any]) -> None:
        for destination in sorted(self.peeks.destinations(room.room_id, self.clock_ms())):
            self.sender(destination).enqueue(event_id, pdu)
        self.poke()

    def _after_event(self, room: TestbedRoom, event_id: str, pdu: dict[str, Any]) -> None:
        self._save(room)
        if pdu.get("type") == "m.room.canonical_alias":
            index_aliases(self.aliases, room, self.rooms)
        # The event that makes a room unpeekable is still delivered; then the peeks end.
        self._push(room, event_id, pdu)
        for peek, why in end_peeks_after(room, pdu, self.peeks, self.clock_ms()):
            self._record("end", peek.origin, peek.room_id, peek.peek_id)
            log.info("peek %r of %s by %s ended: %s", peek.peek_id, room.room_id, peek.origin, why)

    def sender(self, destination: str) -> DestinationSender:
        """The ``/send`` queue to ``destination``, made (and run) on first use."""
        sender = self.senders.get(destination)
        if sender is None:
            sender = DestinationSender(
                destination, self.server_name, self.client, self.faults, on_delivered=self.poke
            )
            self.senders[destination] = sender
            if self.nursery is not None:
                self.nursery.start_soon(sender.run)
        return sender

    # -- EDUs: typing and receipts -----------------------------------------------------------

    def send_edu(self, room_id: str, edu_type: str, content: dict[str, Any]) -> list[str]:
        """Push one EDU to every server peeking the room (as it relays events: the users it
        speaks of may belong to any server). Returns those destinations, sorted.

        Raises:
            MatrixError: 404 unknown room.
        """
        room = self.room(room_id)
        destinations = sorted(self.peeks.destinations(room.room_id, self.clock_ms()))
        for destination in destinations:
            self.sender(destination).enqueue_edu({"edu_type": edu_type, "content": content})
        self.poke()
        return destinations

    def typing(self, room_id: str, user: str, typing: bool) -> list[str]:
        """An ``m.typing`` EDU (SSAPI §Typing Notifications) for ``user`` — of this server or
        any other, joined or not — to the room's peekers; see :meth:`send_edu`."""
        room = self.room(room_id)
        content = {
            "room_id": room.room_id,
            "user_id": any_user_id(self.server_name, user),
            "typing": typing,
        }
        return self.send_edu(room.room_id, "m.typing", content)

    def receipt(
        self, room_id: str, user: str, event_id: str, receipt_type: str = "m.read"
    ) -> list[str]:
        """An ``m.receipt`` EDU (SSAPI §Receipts): ``user`` (any server) has read up to
        ``event_id``; see :meth:`send_edu`."""
        room = self.room(room_id)
        receipt = {"event_ids": [event_id], "data": {"ts": self.clock_ms()}}
        content = {room.room_id: {receipt_type: {any_user_id(self.server_name, user): receipt}}}
        return self.send_edu(room.room_id, "m.receipt", content)

    # -- peeks (MSC2444 R3 + R4 renew) -------------------------------------------------------

    def peek_response(self, room: TestbedRoom) -> dict[str, Any]:
        """The answer to a new peek (MSC2444 R3): ``{state, auth_chain, latest_event,
        renewal_interval (ms), room_version}`` at the room's latest event."""
        state = room.current_state()
        _, latest = room.latest()
        return {
            "state": state,
            "auth_chain": room.auth_chain(state),
            "latest_event": latest,
            "renewal_interval": self.renewal_interval_ms,
            "room_version": room.rules.identifier,
        }

    def put_peek(
        self, origin: str, room_id: str, peek_id: str, versions: list[str]
    ) -> dict[str, Any]:
        """Start or renew a peek (re-PUT of the same peek ID). No await: the state snapshot
        and the start of delivery happen at the same point of the event stream."""
        if not peek_id or len(peek_id.encode()) > 255:
            raise MatrixError(400, "M_UNRECOGNIZED", "peek ID must be 1 to 255 bytes")
        room = self.rooms.get(room_id)
        if room is None:
            raise MatrixError(404, "M_NOT_FOUND", f"unknown room {room_id}")
        check_peekable(room, origin, versions)
        if self.faults.take("peek_count"):
            status, code = self.faults.peek_error()
            extra = {"retry_after_ms": self.faults.peek_retry_after_ms} if status == 429 else {}
            raise MatrixError(status, code, f"injected fault: HTTP {status}", **extra)
        wait = self._rate.take(origin)
        if wait:
            raise MatrixError(
                429,
                "M_LIMIT_EXCEEDED",
                "too many peek requests",
                retry_after_ms=int(wait * 1000) + 1,
            )
        now = self.clock_ms()
        if self.peeks.renew(origin, room_id, peek_id, now) is not None:
            log.info("peek %r of %s renewed by %s", peek_id, room_id, origin)
            self._record("renew", origin, room_id, peek_id)
            if self.config.peeks.renew_reply == "empty" and not self.faults.renew_full:
                return {}
            return self.peek_response(room)
        self.peeks.start(origin, room_id, peek_id, now, self.renewal_interval_ms)
        self.sender(origin)
        self._record("start", origin, room_id, peek_id)
        log.info("peek %r of %s started by %s", peek_id, room_id, origin)
        return self.peek_response(room)

    def renew_peek(self, origin: str, room_id: str, peek_id: str) -> dict[str, Any]:
        """R4 ``POST .../renew``: answers ``{renewal_interval}`` (ms).

        Raises:
            MatrixError: 404 ``M_NOT_FOUND``: no such live peek.
        """
        if self.peeks.renew(origin, room_id, peek_id, self.clock_ms()) is None:
            raise MatrixError(404, "M_NOT_FOUND", "no such peek (it may have expired)")
        self._record("renew", origin, room_id, peek_id)
        return {"renewal_interval": self.renewal_interval_ms}

    def expire_peek(self, origin: str, room_id: str, peek_id: str) -> dict[str, Any]:
        """End a peek as if it had lapsed (the admin API); answers ``{}``.

        Raises:
            MatrixError: 404 ``M_NOT_FOUND``: no such live peek.
        """
        if not self.peeks.delete(origin, room_id, peek_id, self.clock_ms()):
            raise MatrixError(404, "M_NOT_FOUND", "no such peek")
        self._record("expire", origin, room_id, peek_id)
        log.info("peek %r of %s by %s expired by the admin", peek_id, room_id, origin)
        return {}

    def delete_peek(self, origin: str, room_id: str, peek_id: str) -> dict[str, Any]:
        """R3 ``DELETE``: end the peek; answers ``{}``.

        Raises:
            MatrixError: 404 ``M_NOT_FOUND``: no such live peek.
        """
        self._record("delete", origin, room_id, peek_id)
        if not self.peeks.delete(origin, room_id, peek_id, self.clock_ms()):
            raise MatrixError(404, "M_NOT_FOUND", "no such peek")
        log.info("peek %r of %s deleted by %s", peek_id, room_id, origin)
        return {}

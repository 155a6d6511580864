"""The testbed: a small federation server that hosts rooms and serves MSC2444 peeks.

It signs its own events (room versions 10, 11, 12), answers the R3 peek endpoints the way
``shared/reference/protocol.md`` specifies (plus the R4 renew endpoint), pushes every new
event to each active peeker with signed ``/send`` transactions, and serves the read
endpoints MSC2444 R4 opens for world_readable rooms. An admin API on a separate loopback
listener (bearer token) creates rooms, sends events, lists and expires peeks, and injects
faults. Run it with ``peekproxy testbed`` or :func:`run_testbed`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

import trio
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from signedjson.key import read_signing_keys
from signedjson.types import SigningKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from peekproxy import __version__
from peekproxy.api.errors import MatrixError, exception_handlers
from peekproxy.api.federation_auth import authenticate, read_json_body
from peekproxy.core.identifiers import InvalidIdentifier, RoomAlias, ServerName, UserId
from peekproxy.federation.client import FederationClient
from peekproxy.federation.keyring import Keyring, TrustedNotary
from peekproxy.federation.signing_key import key_id, server_key_document, write_new_signing_key
from peekproxy.serving import ServingError, hypercorn_config, open_listeners
from peekproxy.testbed.config import TestbedConfig
from peekproxy.testbed.faults import Faults
from peekproxy.testbed.peeks import PeekRegistry
from peekproxy.testbed.rooms import (
    SUPPORTED_ROOM_VERSIONS,
    RoomError,
    TestbedRoom,
    canonical_aliases,
)
from peekproxy.testbed.sender import DestinationSender

__all__ = ["Testbed", "TestbedListening", "run_testbed"]

log = logging.getLogger("peekproxy.testbed")


@dataclass(frozen=True)
class TestbedListening:
    """Base URLs of the testbed's listeners and its admin token."""

    __test__ = False  # not a pytest test class

    federation: str
    admin: str
    admin_token: str
    server_name: str


def _now_ms() -> int:
    return int(time.time() * 1000)


#: How many peek requests :attr:`Testbed.peek_requests` remembers (the oldest go first).
PEEK_REQUESTS_KEPT = 10_000


@dataclass(frozen=True)
class PeekRequest:
    """One authenticated request to the peek endpoint, as answered: ``method`` (``PUT``,
    ``DELETE``, or ``POST`` for an R4 renew), ``status`` (the HTTP status sent, injected
    faults included) and ``at_ms`` (wall clock, ms)."""

    method: str
    origin: str
    room_id: str
    peek_id: str
    status: int
    at_ms: int

    def to_json(self) -> dict[str, str | int]:
        return asdict(self)


#: State the admin API does not set directly, and what to do instead.
_NOT_STATE = {
    "m.room.member": "m.room.member events are not set as state here; use "
    "POST /rooms/{roomId}/members/join, /leave or /invite",
    "m.room.create": "the m.room.create event is made with the room; set room_version "
    "and creator when creating it",
}


class _TokenBucket:
    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 when allowed, else seconds until a token is available."""
        now = self.clock()
        tokens, last = self.buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1:
            self.buckets[key] = (tokens - 1, now)
            return 0.0
        self.buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate


class Testbed:
    """The testbed's state and behaviour; the HTTP apps are thin layers over it."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        config: TestbedConfig,
        signing_key: SigningKey,
        client: FederationClient,
        keyring: Keyring,
        clock_ms: Callable[[], int] = _now_ms,
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
        self._rate = _TokenBucket(
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

    # -- persistence -------------------------------------------------------------------------

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
            key = _load_or_create_key(self.remote_keys_dir / f"{server_name}.key")
            self.remote_keys[server_name] = key
        return key

    def _signer_of(self, user_id: str) -> tuple[str, SigningKey]:
        """(full user ID, signing key) for a local user or a simulated remote server's user."""
        server = user_id.partition(":")[2] if user_id.startswith("@") else ""
        key = self.remote_keys.get(server)
        if key is not None:
            try:
                UserId.parse(user_id)
            except InvalidIdentifier as e:
                raise MatrixError(400, "M_INVALID_PARAM", f"bad user ID: {e}") from None
            return user_id, key
        return self.local_user(user_id), self.signing_key

    def load_rooms(self) -> int:
        """Load rooms saved in ``<data_dir>/rooms``; returns how many. They are kept in
        creation order (the create event's ``origin_server_ts``, then the room ID), and the
        alias directory is rebuilt from their ``m.room.canonical_alias`` state.

        Raises:
            ServingError: ``<file>: <problem>`` for a file that cannot be read, is not JSON,
                fails the room checks (content hashes, signatures by this testbed's key, the
                DAG), belongs to another server name, or repeats a room of another file.
        """
        for key_file in sorted(self.remote_keys_dir.glob("*.key")):
            self.remote_keys[key_file.stem] = _load_or_create_key(key_file)
        if not self.rooms_dir.is_dir():
            return 0
        loaded: dict[str, tuple[TestbedRoom, Path]] = {}
        for file in sorted(self.rooms_dir.glob("*.json")):
            room = self._load_room(file)
            if room.room_id in loaded:
                raise ServingError(
                    f"{file}: room {room.room_id} is also saved in {loaded[room.room_id][1]}"
                )
            loaded[room.room_id] = (room, file)

        def created(room: TestbedRoom) -> tuple[int, str]:
            ts = room.events[0].get("origin_server_ts")
            return (ts if isinstance(ts, int) else 0, room.room_id)

        for room, _ in sorted(loaded.values(), key=lambda item: created(item[0])):
            self.rooms[room.room_id] = room
            self._index_aliases(room)
        return len(self.rooms)

    def _load_room(self, file: Path) -> TestbedRoom:
        try:
            text = file.read_text("utf-8")
        except UnicodeDecodeError:
            raise ServingError(f"{file}: not a saved room (not UTF-8 text)") from None
        except OSError as e:
            raise ServingError(f"{file}: cannot read it: {e.strerror or e}") from None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise ServingError(f"{file}: not valid JSON (truncated?): {e}") from None
        try:
            return TestbedRoom.from_json(
                data,
                server_name=self.server_name,
                signing_key=self.signing_key,
                remote_keys=self.remote_keys,
            )
        except RoomError as e:
            raise ServingError(f"{file}: {e}") from None

    def _save(self, room: TestbedRoom) -> None:
        self.rooms_dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(room.room_id.encode()).hexdigest()[:32]
        target = self.rooms_dir / f"{name}.json"
        temporary = target.with_suffix(".tmp")
        temporary.write_text(json.dumps(room.to_json(), ensure_ascii=False))
        os.replace(temporary, target)

    # -- rooms ---------------------------------------------------------------------------------

    def local_user(self, user: str) -> str:
        """``alice`` or ``@alice:<testbed>`` as a full user ID.

        Raises:
            MatrixError: 400 ``M_INVALID_PARAM``: not a valid, compliant user ID of this
                server.
        """
        full = user if user.startswith("@") else f"@{user}:{self.server_name}"
        try:
            parsed = UserId.parse(full)
        except InvalidIdentifier as e:
            raise MatrixError(400, "M_INVALID_PARAM", f"bad user ID: {e}") from None
        if full.partition(":")[2] != self.server_name:
            raise MatrixError(400, "M_INVALID_PARAM", f"{full!r} is not a user of this server")
        if not parsed.is_compliant:
            raise MatrixError(
                400,
                "M_INVALID_PARAM",
                f"bad user ID {full!r}: the localpart may only use a-z 0-9 . _ = - / +",
            )
        return full

    def room(self, room_id: str) -> TestbedRoom:
        """The room with that ID, or (admin convenience) that alias in the directory.

        Raises:
            MatrixError: 404 ``M_NOT_FOUND``.
        """
        room = self.rooms.get(room_id) or self.rooms.get(self.aliases.get(room_id, ""))
        if room is None:
            raise MatrixError(404, "M_NOT_FOUND", f"unknown room {room_id}")
        return room

    # -- the alias directory: follows each room's m.room.canonical_alias ---------------------

    def _check_aliases_free(self, room_id: str | None, aliases: list[str]) -> None:
        for alias in aliases:
            holder = self.aliases.get(alias)
            if holder is not None and holder != room_id:
                raise MatrixError(409, "M_ROOM_IN_USE", f"{alias} is taken by {holder}")

    def _index_aliases(self, room: TestbedRoom) -> None:
        """Point the directory at ``room`` for exactly the aliases its current
        ``m.room.canonical_alias`` claims (``alias`` and ``alt_aliases``)."""
        for alias in [a for a, held in self.aliases.items() if held == room.room_id]:
            del self.aliases[alias]
        for alias in room.local_aliases():
            holder = self.aliases.get(alias)
            if holder is not None and holder != room.room_id:
                # Only rooms saved before claims were checked can clash: the newer claim wins.
                ours = self._alias_claimed_at(room) >= self._alias_claimed_at(self.rooms[holder])
                log.warning(
                    "alias %s is claimed by %s and %s; keeping %s",
                    alias,
                    holder,
                    room.room_id,
                    room.room_id if ours else holder,
                )
                if not ours:
                    continue
            self.aliases[alias] = room.room_id

    @staticmethod
    def _alias_claimed_at(room: TestbedRoom) -> int:
        event = room.state_event("m.room.canonical_alias")
        ts = None if event is None else event.get("origin_server_ts")
        return ts if isinstance(ts, int) else 0

    # -- rooms -----------------------------------------------------------------------------------

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
            self._check_aliases_free(None, [full_alias])
        for number, item in enumerate(initial_state):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind in _NOT_STATE:
                raise MatrixError(
                    400, "M_INVALID_PARAM", f"initial_state[{number}]: {_NOT_STATE[kind]}"
                )
        try:
            room = TestbedRoom.create(
                server_name=self.server_name,
                signing_key=self.signing_key,
                room_version=room_version,
                creator=self.local_user(creator),
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
                self._check_aliases_free(None, canonical_aliases(pdu["content"], self.server_name))
        self.rooms[room.room_id] = room
        self._index_aliases(room)
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
            self._check_aliases_free(room.room_id, claimed)
        try:
            event_id, pdu = room.send(
                self.signing_key,
                sender=self.local_user(sender),
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
                    sender=self.local_user(sender or "admin"),
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

    def _after_event(self, room: TestbedRoom, event_id: str, pdu: dict[str, Any]) -> None:
        self._save(room)
        if pdu.get("type") == "m.room.canonical_alias":
            self._index_aliases(room)
        # The event that makes a room unpeekable is still delivered; then the peeks end.
        for destination in sorted(self.peeks.destinations(room.room_id, self.clock_ms())):
            self.sender(destination).enqueue(event_id, pdu)
        self.poke()
        if not room.is_world_readable() or room.is_encrypted():
            for peek in self.peeks.end_room(room.room_id):
                self._record("end", peek.origin, peek.room_id, peek.peek_id)
                log.info(
                    "peek %r of %s by %s ended: room no longer peekable",
                    peek.peek_id,
                    room.room_id,
                    peek.origin,
                )
            return
        if pdu.get("type") != "m.room.server_acl":
            return
        now = self.clock_ms()
        for peek in self.peeks.active(now):
            if peek.room_id == room.room_id and not room.server_acl_allows(peek.origin):
                self.peeks.delete(peek.origin, peek.room_id, peek.peek_id, now)
                self._record("end", peek.origin, peek.room_id, peek.peek_id)
                log.info(
                    "peek %r of %s by %s ended: denied by the server ACL",
                    peek.peek_id,
                    room.room_id,
                    peek.origin,
                )

    def sender(self, destination: str) -> DestinationSender:
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

    def _any_user(self, user: str) -> str:
        full = user if user.startswith("@") else f"@{user}:{self.server_name}"
        try:
            UserId.parse(full)
        except InvalidIdentifier as e:
            raise MatrixError(400, "M_INVALID_PARAM", f"bad user ID: {e}") from None
        return full

    def typing(self, room_id: str, user: str, typing: bool) -> list[str]:
        """An ``m.typing`` EDU (SSAPI §Typing Notifications) for ``user`` — of this server or
        any other, joined or not — to the room's peekers; see :meth:`send_edu`."""
        room = self.room(room_id)
        content = {"room_id": room.room_id, "user_id": self._any_user(user), "typing": typing}
        return self.send_edu(room.room_id, "m.typing", content)

    def receipt(
        self, room_id: str, user: str, event_id: str, receipt_type: str = "m.read"
    ) -> list[str]:
        """An ``m.receipt`` EDU (SSAPI §Receipts): ``user`` (any server) has read up to
        ``event_id``; see :meth:`send_edu`."""
        room = self.room(room_id)
        receipt = {"event_ids": [event_id], "data": {"ts": self.clock_ms()}}
        content = {room.room_id: {receipt_type: {self._any_user(user): receipt}}}
        return self.send_edu(room.room_id, "m.receipt", content)

    # -- peeks (MSC2444 R3 + R4 renew) -------------------------------------------------------

    def peek_response(self, room: TestbedRoom) -> dict[str, Any]:
        state = room.current_state()
        _, latest = room.latest()
        return {
            "state": state,
            "auth_chain": room.auth_chain(state),
            "latest_event": latest,
            "renewal_interval": self.renewal_interval_ms,
            "room_version": room.rules.identifier,
        }

    @staticmethod
    def check_acl(room: TestbedRoom, origin: str) -> None:
        """403 ``M_FORBIDDEN`` when the room's ``m.room.server_acl`` denies ``origin``."""
        if not room.server_acl_allows(origin):
            raise MatrixError(403, "M_FORBIDDEN", "Forbidden by server ACLs")

    def check_peekable(self, room: TestbedRoom, origin: str, versions: list[str]) -> None:
        if room.rules.identifier not in versions:
            raise MatrixError(
                400,
                "M_INCOMPATIBLE_ROOM_VERSION",
                f"the room is version {room.rules.identifier}, not in your ver list",
                room_version=room.rules.identifier,
            )
        self.check_acl(room, origin)
        if room.is_encrypted():
            raise MatrixError(403, "M_FORBIDDEN", "Cannot peek into an encrypted room")
        if not room.is_world_readable():
            raise MatrixError(
                403,
                "M_FORBIDDEN",
                f"history_visibility is {room.history_visibility()!r}, not world_readable",
            )

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
        self.check_peekable(room, origin, versions)
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
        if self.peeks.renew(origin, room_id, peek_id, self.clock_ms()) is None:
            raise MatrixError(404, "M_NOT_FOUND", "no such peek (it may have expired)")
        self._record("renew", origin, room_id, peek_id)
        return {"renewal_interval": self.renewal_interval_ms}

    def delete_peek(self, origin: str, room_id: str, peek_id: str) -> dict[str, Any]:
        self._record("delete", origin, room_id, peek_id)
        if not self.peeks.delete(origin, room_id, peek_id, self.clock_ms()):
            raise MatrixError(404, "M_NOT_FOUND", "no such peek")
        log.info("peek %r of %s deleted by %s", peek_id, room_id, origin)
        return {}

    def readable_room(self, room_id: str, origin: str) -> TestbedRoom:
        """A room ``origin`` may read over federation: known (404), allowed by its server ACL
        (403) and world_readable (403)."""
        room = self.rooms.get(room_id)
        if room is None:
            raise MatrixError(404, "M_NOT_FOUND", f"unknown room {room_id}")
        self.check_acl(room, origin)
        if not room.is_world_readable():
            raise MatrixError(403, "M_FORBIDDEN", "room is not world_readable")
        return room


# -- request bodies ---------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateRoomBody(_Body):
    room_version: str = "10"
    creator: str = "admin"
    alias: str | None = None
    history_visibility: str = "world_readable"
    join_rule: str = "public"
    encrypted: bool = False
    name: str | None = None
    topic: str | None = None
    initial_state: list[dict[str, Any]] = Field(default_factory=list)


class SendBody(_Body):
    sender: str = "admin"
    type: str = "m.room.message"
    content: dict[str, Any]
    state_key: str | None = None


class MembershipBody(_Body):
    user: str
    sender: str | None = None  # the inviter (invite only; default "admin")


class TypingBody(_Body):
    user: str
    typing: bool = True


class ReceiptBody(_Body):
    user: str
    event_id: str
    receipt_type: str = "m.read"


class RemoteServerBody(_Body):
    server_name: str


class ConfigBody(_Body):
    renewal_interval_ms: int = Field(ge=100)


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()
        )
        raise MatrixError(400, "M_BAD_JSON", problems) from None


# -- HTTP apps ----------------------------------------------------------------------------------


def _raw_segments(request: Request, prefix: str) -> list[str]:
    """The path after ``prefix``, split on ``/`` in the raw (still percent-encoded) request
    path and then percent-decoded segment by segment, so ``%2F`` stays inside a segment.

    Raises:
        MatrixError: 404 ``M_UNRECOGNIZED`` when the raw path does not start with
            ``prefix``; 400 ``M_INVALID_PARAM`` for a segment that is not UTF-8.
    """
    raw: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    if not raw.startswith(prefix.encode()):
        raise MatrixError(404, "M_UNRECOGNIZED", "Unrecognized request")
    try:
        return [
            unquote_to_bytes(segment).decode("utf-8") for segment in raw[len(prefix) :].split(b"/")
        ]
    except UnicodeDecodeError:
        raise MatrixError(400, "M_INVALID_PARAM", "a path segment is not UTF-8") from None


def federation_app(testbed: Testbed) -> Starlette:
    """The testbed's federation listener."""
    server_name = testbed.server_name

    async def auth(request: Request) -> tuple[str, Any]:
        verified = await authenticate(request, server_name=server_name, keyring=testbed.keyring)
        return verified.origin, verified.content

    async def key_server(request: Request) -> Response:
        return JSONResponse(
            server_key_document(
                server_name, testbed.signing_key, now_ms=_now_ms(), valid_for_ms=86_400_000
            )
        )

    async def version(request: Request) -> Response:
        return JSONResponse({"server": {"name": "peekproxy-testbed", "version": __version__}})

    async def query_directory(request: Request) -> Response:
        await auth(request)
        alias = request.query_params.get("room_alias", "")
        room_id = testbed.aliases.get(alias)
        if room_id is None:
            raise MatrixError(404, "M_NOT_FOUND", "Room alias not found.")
        return JSONResponse({"room_id": room_id, "servers": [server_name]})

    async def peek(request: Request) -> Response:
        # Room and peek ID come from the raw path, segment by segment, so that a peek ID
        # holding "/" (sent as %2F) is one segment: PUT/DELETE .../peek/{roomId}/{peekId},
        # POST .../peek/{roomId}/{peekId}/renew.
        segments = _raw_segments(request, f"{prefix}/peek/")
        renewing = len(segments) == 3 and segments[2] == "renew"
        if not (len(segments) == 2 or renewing) or (request.method == "POST") != renewing:
            raise MatrixError(404, "M_UNRECOGNIZED", "Unrecognized request")
        origin, content = await auth(request)
        room_id, peek_id = segments[0], segments[1]
        status = 500
        try:
            if renewing:
                answer = testbed.renew_peek(origin, room_id, peek_id)
            elif request.method == "DELETE":
                answer = testbed.delete_peek(origin, room_id, peek_id)
            elif not isinstance(content, dict):
                raise MatrixError(400, "M_BAD_JSON", "the peek request body must be a JSON object")
            else:
                versions = request.query_params.getlist("ver") or ["1"]
                answer = testbed.put_peek(origin, room_id, peek_id, versions)
            status = 200
            return JSONResponse(answer)
        except MatrixError as e:
            status = e.status
            raise
        finally:
            testbed.peek_requests.append(
                PeekRequest(request.method, origin, room_id, peek_id, status, _now_ms())
            )

    async def event(request: Request) -> Response:
        origin, _ = await auth(request)
        event_id = request.path_params["event_id"]
        for room in testbed.rooms.values():
            pdu = room.event(event_id)
            if pdu is not None:
                testbed.readable_room(room.room_id, origin)
                return JSONResponse(
                    {"origin": server_name, "origin_server_ts": _now_ms(), "pdus": [pdu]}
                )
        raise MatrixError(404, "M_NOT_FOUND", f"unknown event {event_id}")

    def _at(room: TestbedRoom, request: Request) -> str:
        event_id = request.query_params.get("event_id") or room.latest()[0]
        if room.index_of(event_id) is None:
            raise MatrixError(404, "M_NOT_FOUND", f"unknown event {event_id}")
        return event_id

    async def state(request: Request) -> Response:
        origin, _ = await auth(request)
        room = testbed.readable_room(request.path_params["room_id"], origin)
        pdus = room.state_at(_at(room, request))
        return JSONResponse({"pdus": pdus, "auth_chain": room.auth_chain(pdus)})

    async def state_ids(request: Request) -> Response:
        origin, _ = await auth(request)
        room = testbed.readable_room(request.path_params["room_id"], origin)
        at = _at(room, request)
        auth_ids = room.auth_chain_ids(room.state_at(at))
        return JSONResponse({"pdu_ids": room.state_ids_at(at), "auth_chain_ids": auth_ids})

    async def backfill(request: Request) -> Response:
        origin, _ = await auth(request)
        room = testbed.readable_room(request.path_params["room_id"], origin)
        starts = request.query_params.getlist("v")
        try:
            limit = max(1, min(int(request.query_params.get("limit", "10")), 1000))
        except ValueError:
            raise MatrixError(400, "M_INVALID_PARAM", "limit must be an integer") from None
        if not starts or any(room.index_of(e) is None for e in starts):
            raise MatrixError(400, "M_INVALID_PARAM", "v must name events of the room")
        if testbed.faults.backfill_delay_ms:
            await trio.sleep(testbed.faults.backfill_delay_ms / 1000)
        if testbed.faults.take("backfill_fail_next"):
            raise MatrixError(500, "M_UNKNOWN", "injected backfill failure")
        return JSONResponse(
            {
                "origin": server_name,
                "origin_server_ts": _now_ms(),
                "pdus": room.backfill(starts, limit),
            }
        )

    async def missing_events(request: Request) -> Response:
        origin, content = await auth(request)
        room = testbed.readable_room(request.path_params["room_id"], origin)
        if not isinstance(content, dict):
            raise MatrixError(400, "M_BAD_JSON", "body must be an object")
        earliest = content.get("earliest_events", [])
        latest = content.get("latest_events", [])
        limit, min_depth = content.get("limit", 10), content.get("min_depth", 0)
        if not (
            isinstance(earliest, list)
            and isinstance(latest, list)
            and isinstance(limit, int)
            and isinstance(min_depth, int)
        ):
            raise MatrixError(
                400, "M_BAD_JSON", "earliest_events/latest_events lists, limit/min_depth integers"
            )
        if testbed.faults.take("missing_events_empty_next"):
            return JSONResponse({"events": []})
        events = room.missing_events(earliest, latest, max(0, min(limit, 1000)), min_depth)
        return JSONResponse({"events": events})

    prefix = "/_matrix/federation/v1"
    app = Starlette(
        routes=[
            Route("/_matrix/key/v2/server", key_server, methods=["GET"]),
            Route(f"{prefix}/version", version, methods=["GET"]),
            Route(f"{prefix}/query/directory", query_directory, methods=["GET"]),
            Route(f"{prefix}/peek/{{rest:path}}", peek, methods=["PUT", "DELETE", "POST"]),
            Route(f"{prefix}/event/{{event_id}}", event, methods=["GET"]),
            Route(f"{prefix}/state/{{room_id}}", state, methods=["GET"]),
            Route(f"{prefix}/state_ids/{{room_id}}", state_ids, methods=["GET"]),
            Route(f"{prefix}/backfill/{{room_id}}", backfill, methods=["GET"]),
            Route(f"{prefix}/get_missing_events/{{room_id}}", missing_events, methods=["POST"]),
        ],
        exception_handlers=exception_handlers(),
    )
    app.router.redirect_slashes = False
    return app


def admin_app(testbed: Testbed, token: str) -> Starlette:
    """The admin API (``/_testbed/v1``), bearer-token protected."""

    def check(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "missing or wrong admin token")

    async def body(request: Request) -> Any:
        return await read_json_body(request)

    def summary(room: TestbedRoom) -> dict[str, Any]:
        latest_id, _ = room.latest()
        return {
            "room_id": room.room_id,
            "room_version": room.rules.identifier,
            "alias": room.canonical_alias(),
            "history_visibility": room.history_visibility(),
            "encrypted": room.is_encrypted(),
            "joined": room.joined_users(),
            "latest_event_id": latest_id,
            "event_count": len(room.events),
        }

    async def rooms(request: Request) -> Response:
        check(request)
        if request.method == "GET":
            return JSONResponse({"rooms": [summary(r) for r in testbed.rooms.values()]})
        spec = _parse(CreateRoomBody, await body(request))
        room = testbed.create_room(**spec.model_dump())
        return JSONResponse(summary(room))

    async def room(request: Request) -> Response:
        check(request)
        return JSONResponse(summary(testbed.room(request.path_params["room_id"])))

    async def events(request: Request) -> Response:
        check(request)
        target = testbed.room(request.path_params["room_id"])
        return JSONResponse(
            {
                "room_version": target.rules.identifier,
                "events": [
                    {"event_id": e, "pdu": p}
                    for e, p in zip(target.event_ids, target.events, strict=True)
                ],
            }
        )

    async def send(request: Request) -> Response:
        check(request)
        kind = request.path_params["kind"]
        if kind not in ("send", "state"):
            raise MatrixError(404, "M_UNRECOGNIZED", "Unrecognized request")
        spec = _parse(SendBody, await body(request))
        if kind == "state" and spec.state_key is None:
            spec = spec.model_copy(update={"state_key": ""})
        if kind == "send" and spec.state_key is not None:
            raise MatrixError(400, "M_INVALID_PARAM", "use /state for state events")
        if spec.state_key is not None and spec.type in _NOT_STATE:
            raise MatrixError(400, "M_INVALID_PARAM", _NOT_STATE[spec.type])
        event_id = testbed.send(
            request.path_params["room_id"],
            sender=spec.sender,
            type=spec.type,
            content=spec.content,
            state_key=spec.state_key,
        )
        return JSONResponse({"event_id": event_id})

    async def membership(request: Request) -> Response:
        check(request)
        spec = _parse(MembershipBody, await body(request))
        kind = request.path_params["membership"]
        if spec.sender is not None and kind != "invite":
            raise MatrixError(400, "M_INVALID_PARAM", f"{kind} is sent by the user; no sender")
        event_id = testbed.membership(
            request.path_params["room_id"], spec.user, kind, sender=spec.sender
        )
        return JSONResponse({"event_id": event_id})

    async def typing(request: Request) -> Response:
        check(request)
        spec = _parse(TypingBody, await body(request))
        sent = testbed.typing(request.path_params["room_id"], spec.user, spec.typing)
        return JSONResponse({"destinations": sent})

    async def receipt(request: Request) -> Response:
        check(request)
        spec = _parse(ReceiptBody, await body(request))
        sent = testbed.receipt(
            request.path_params["room_id"], spec.user, spec.event_id, spec.receipt_type
        )
        return JSONResponse({"destinations": sent})

    async def remote_servers(request: Request) -> Response:
        check(request)
        if request.method == "POST":
            testbed.add_remote_server(_parse(RemoteServerBody, await body(request)).server_name)
        now = testbed.clock_ms()
        return JSONResponse(
            {
                "remote_servers": {
                    name: server_key_document(name, key, now_ms=now, valid_for_ms=86_400_000)
                    for name, key in sorted(testbed.remote_keys.items())
                }
            }
        )

    async def peeks(request: Request) -> Response:
        check(request)
        active = testbed.peeks.active(testbed.clock_ms())
        return JSONResponse({"peeks": [p.to_json() for p in active]})

    async def peek_requests(request: Request) -> Response:
        check(request)
        return JSONResponse({"requests": [r.to_json() for r in testbed.peek_requests]})

    async def expire_peek(request: Request) -> Response:
        check(request)
        # Raw segments, so that peek IDs holding "/" (as %2F) can be named.
        segments = _raw_segments(request, "/_testbed/v1/peeks/")
        if len(segments) != 3:
            raise MatrixError(404, "M_UNRECOGNIZED", "use DELETE /peeks/{origin}/{roomId}/{peekId}")
        origin, room_id, peek_id = segments
        if not testbed.peeks.delete(origin, room_id, peek_id, testbed.clock_ms()):
            raise MatrixError(404, "M_NOT_FOUND", "no such peek")
        testbed._record("expire", origin, room_id, peek_id)
        log.info("peek %r of %s by %s expired by the admin", peek_id, room_id, origin)
        return JSONResponse({})

    async def faults(request: Request) -> Response:
        check(request)
        if request.method == "PUT":
            changes = await body(request)
            if not isinstance(changes, dict):
                raise MatrixError(400, "M_BAD_JSON", "body must be an object")
            try:
                testbed.faults.update(changes)
            except ValueError as e:
                raise MatrixError(400, "M_INVALID_PARAM", str(e)) from None
        return JSONResponse(testbed.faults.to_json())

    async def outbox(request: Request) -> Response:
        check(request)
        return JSONResponse(
            {
                destination: {
                    "pending": len(sender.pending),
                    "sending": None if sender.sending is None else sender.sending.to_json(),
                    "withheld": sender.withheld,
                    "transactions": [t.to_json() for t in sender.transactions],
                }
                for destination, sender in testbed.senders.items()
            }
        )

    async def settings(request: Request) -> Response:
        check(request)
        if request.method == "PUT":
            spec = _parse(ConfigBody, await body(request))
            testbed.renewal_interval_ms = spec.renewal_interval_ms
        return JSONResponse({"renewal_interval_ms": testbed.renewal_interval_ms})

    prefix = "/_testbed/v1"
    app = Starlette(
        routes=[
            Route(f"{prefix}/rooms", rooms, methods=["GET", "POST"]),
            Route(f"{prefix}/rooms/{{room_id}}", room, methods=["GET"]),
            Route(f"{prefix}/rooms/{{room_id}}/events", events, methods=["GET"]),
            Route(f"{prefix}/rooms/{{room_id}}/typing", typing, methods=["POST"]),
            Route(f"{prefix}/rooms/{{room_id}}/receipt", receipt, methods=["POST"]),
            Route(f"{prefix}/rooms/{{room_id}}/{{kind:str}}", send, methods=["POST"]),
            Route(
                f"{prefix}/rooms/{{room_id}}/members/{{membership}}", membership, methods=["POST"]
            ),
            Route(f"{prefix}/remote_servers", remote_servers, methods=["GET", "POST"]),
            Route(f"{prefix}/peeks", peeks, methods=["GET"]),
            Route(f"{prefix}/peek_requests", peek_requests, methods=["GET"]),
            Route(f"{prefix}/peeks/{{rest:path}}", expire_peek, methods=["DELETE"]),
            Route(f"{prefix}/faults", faults, methods=["GET", "PUT"]),
            Route(f"{prefix}/outbox", outbox, methods=["GET"]),
            Route(f"{prefix}/config", settings, methods=["GET", "PUT"]),
        ],
        exception_handlers=exception_handlers(),
    )
    app.router.redirect_slashes = False
    return app


# -- running -------------------------------------------------------------------------------------


def _load_or_create_key(path: Path) -> SigningKey:
    """The signing key in ``path``, created when missing.

    Raises:
        ServingError: ``<path>: <problem>`` for a file that holds no usable key.
    """
    if path.exists():
        try:
            with open(path, encoding="utf-8") as stream:
                keys = read_signing_keys(stream)
        except (ValueError, UnicodeDecodeError) as e:
            raise ServingError(f"{path}: not a signing key file: {e}") from None
        if not keys:
            raise ServingError(f"{path}: the signing key file is empty")
        key: SigningKey = keys[0]
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_new_signing_key(path, version_prefix="tb_")


def _load_or_create_token(path: Path) -> str:
    """The admin token in ``path``, created when missing.

    Raises:
        ServingError: the file is empty or not text.
    """
    if path.exists():
        try:
            token = path.read_text("utf-8").strip()
        except UnicodeDecodeError:
            raise ServingError(f"{path}: the admin token file is not text") from None
        if not token:
            raise ServingError(f"{path}: the admin token file is empty")
        return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as stream:
        stream.write(token + "\n")
    return token


async def run_testbed(
    config: TestbedConfig,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[tuple[TestbedListening, Testbed]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the testbed until ``shutdown`` is set.

    ``task_status.started((TestbedListening(...), testbed))`` once both listeners are bound,
    so an in-process test can also drive the :class:`Testbed` object directly.

    Raises:
        ServingError: the data directory cannot be used (a damaged signing key, admin token
            or room file, or rooms of another server name; the message names the file), or
            a listener cannot bind.
    """
    if shutdown is None:
        shutdown = trio.Event()
    signing_key = _load_or_create_key(config.server.key_file)
    token = _load_or_create_token(config.token_file)
    client = FederationClient.from_config(
        config.federation, server_name=config.server.server_name, signing_key=signing_key
    )
    keyring = Keyring(
        client,
        None,
        [
            TrustedNotary(n.server_name, n.verify_keys)
            for n in config.federation.trusted_key_servers
        ],
    )
    testbed = Testbed(config, signing_key, client, keyring)
    try:
        loaded = await trio.to_thread.run_sync(testbed.load_rooms)
        async with trio.open_nursery() as nursery:
            testbed.nursery = nursery
            for sender in testbed.senders.values():
                nursery.start_soon(sender.run)
            listeners = config.listeners
            async with open_listeners(shutdown) as servers:
                federation_url = await servers.start(
                    "listeners.federation.bind",
                    federation_app(testbed),
                    hypercorn_config(
                        listeners.federation.bind,
                        grace=1.0,
                        access_log=config.logging.access_log,
                        certfile=listeners.federation.tls_certificate_file,
                        keyfile=listeners.federation.tls_private_key_file,
                    ),
                )
                admin_url = await servers.start(
                    "listeners.admin.bind",
                    admin_app(testbed, token),
                    hypercorn_config(listeners.admin.bind, grace=1.0, access_log=False),
                )
                listening = TestbedListening(
                    federation_url, admin_url, token, config.server.server_name
                )
                log.info(
                    "testbed ready: server_name=%s key=%s federation=%s admin=%s "
                    "token_file=%s rooms=%d",
                    config.server.server_name,
                    key_id(signing_key),
                    federation_url,
                    admin_url,
                    config.token_file,
                    loaded,
                )
                task_status.started((listening, testbed))
                await shutdown.wait()
                # The listeners drain (1 s grace), the senders get 2 s in all.
                nursery.cancel_scope.deadline = trio.current_time() + 2
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()

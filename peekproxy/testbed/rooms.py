"""Rooms hosted by the testbed, as a pure model: events in, PDUs and state out.

A :class:`TestbedRoom` holds one room's PDUs exactly as they go over federation, in DAG order
(which is also stream order), plus indexes derived from them. It creates, hashes and signs new
events the way Synapse does for the same room (content, ``auth_events`` and key layout mirror
the real PDUs in ``tests/fixtures/synapse-pdus``), and answers the queries the testbed's
federation endpoints need: state at an event, auth chains, ``/backfill`` and
``/get_missing_events``.

Pure: no I/O and no clock. Time comes in as ``now_ms`` (milliseconds since the Unix epoch);
only :meth:`TestbedRoom.create` draws randomness (the opaque part of a v10/v11 room ID, from
:mod:`secrets`).

Scope and simplifications (this is a test peer, not a homeserver):

* room versions 10, 11 and 12 only (:data:`SUPPORTED_ROOM_VERSIONS`);
* local users (``@x:<server_name>``) send events; so may users of a *simulated remote
  server* whose signing key the caller holds (``origin=`` of :meth:`TestbedRoom.send`): the
  testbed then stands in for that server, as if its events had come over federation;
* state is a linear fold over the events in stream order. ``send(prev_events=...)`` can fork
  the DAG, but there is no state resolution: ``auth_events`` and state still come from that
  fold;
* every event the testbed's users send must pass the room version's authorization rules
  against the current state (:func:`peekproxy.core.auth_rules.check_against_state`, the code
  peekproxy itself judges received PDUs with), plus the testbed's own content checks (see
  :meth:`TestbedRoom.send`). Only :meth:`TestbedRoom.send_illegal` (the testbed's
  ``relay_illegal`` fault) makes events the rules reject: they enter the DAG (later events'
  ``prev_events`` may point at them) but never the state, as a receiving server rejects them;
* redactions are stored as events, but the events they redact are stored and served unchanged.

Spec references: "SSAPI" is the server-server API, "rooms/vN" the room version pages, "APPX"
the appendices; ``federation.md`` is ``shared/reference/federation.md``.
"""

from __future__ import annotations

import bisect
import copy
import heapq
import secrets
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from signedjson.key import get_verify_key
from signedjson.types import SigningKey
from unpaddedbase64 import encode_base64

from peekproxy.core.auth_rules import (
    StateKey,
    auth_types_for_event,
    check_against_state,
    check_event_auth,
    create_event_id,
)
from peekproxy.core.events import compute_event_id, content_hash, room_id_for_create
from peekproxy.core.identifiers import InvalidIdentifier, RoomAlias, ServerName, UserId
from peekproxy.core.membership import sign_event
from peekproxy.core.pdu import check_pdu
from peekproxy.core.pdu_signatures import VerifyKeyInfo, key_table
from peekproxy.core.room_versions import RoomVersion, UnknownRoomVersion, room_version
from peekproxy.core.server_acl import server_allowed

__all__ = [
    "HISTORY_VISIBILITIES",
    "JOIN_RULES",
    "SUPPORTED_ROOM_VERSIONS",
    "RoomError",
    "TestbedRoom",
    "UnknownEventError",
    "canonical_aliases",
]


class RoomError(Exception):
    """A bad request against a room: unknown or unsupported room version, a sender that is
    not a local user or not joined, malformed content, an inconsistent saved room. The
    message is meant for an HTTP 400 response."""


class UnknownEventError(RoomError):
    """The event ID is not an event of this room (an HTTP 404 where the caller can tell)."""


@dataclass(frozen=True, slots=True)
class _Features:
    """What event creation depends on, beyond :class:`RoomVersion`'s verification rules."""

    #: rooms/v11 (MSC2175): ``m.room.create`` content has no ``creator``; the sender is it.
    creator_in_create_content: bool
    #: rooms/v11 (MSC2174): ``redacts`` moves from the top level into ``content``.
    redacts_in_content: bool
    #: rooms/v12 (MSC4291): the room ID is the create event's reference hash, the create
    #: event has no ``room_id``, and no event lists the create event in ``auth_events``.
    room_id_is_create_hash: bool
    #: rooms/v12 (MSC4289): creators have unbounded power and are not listed in the
    #: power_levels ``users``; Synapse then raises ``m.room.tombstone`` to 150.
    creators_outrank_power_levels: bool


_FEATURES: Mapping[str, _Features] = {
    "10": _Features(True, False, False, False),
    "11": _Features(False, True, False, False),
    "12": _Features(False, True, True, True),
}
#: The room versions :class:`TestbedRoom` can create and load.
SUPPORTED_ROOM_VERSIONS: tuple[str, ...] = tuple(_FEATURES)

_CREATE = ("m.room.create", "")
_POWER_LEVELS = ("m.room.power_levels", "")
_JOIN_RULES = ("m.room.join_rules", "")
_HISTORY_VISIBILITY = ("m.room.history_visibility", "")
_CANONICAL_ALIAS = ("m.room.canonical_alias", "")
_ENCRYPTION = ("m.room.encryption", "")
_SERVER_ACL = ("m.room.server_acl", "")
_MEMBER = "m.room.member"
#: Room-ID opaque part of v10/v11 rooms, as Synapse makes them: 18 random ASCII letters.
_ROOM_ID_LETTERS = 18
#: The ``history_visibility`` values of CSAPI §Room History Visibility.
HISTORY_VISIBILITIES: tuple[str, ...] = ("world_readable", "shared", "invited", "joined")
#: The ``join_rule`` values the room versions 10-12 know (rooms/v10 auth rules).
JOIN_RULES: tuple[str, ...] = (
    "public",
    "invite",
    "knock",
    "restricted",
    "knock_restricted",
    "private",
)
#: The order of the auth events the testbed cites, as Synapse lists them (the fixtures):
#: create, power levels, the sender's member event, the target's, the join rules, then the
#: rest (third-party invite, restricted-join authoriser) in DAG order.
_AUTH_ORDER = {_CREATE: 0, _POWER_LEVELS: 1, _JOIN_RULES: 4}
#: The power level the creator keeps in v10/v11 (it sends everything the admin API sends).
_CREATOR_POWER = 100


def _version_features(identifier: str) -> tuple[RoomVersion, _Features]:
    try:
        rules = room_version(identifier)
    except UnknownRoomVersion as e:
        raise RoomError(str(e)) from None
    features = _FEATURES.get(identifier)
    if features is None:
        supported = ", ".join(SUPPORTED_ROOM_VERSIONS)
        raise RoomError(f"the testbed hosts room versions {supported}, not {identifier!r}")
    return rules, features


def _json_copy(value: object, depth: int = 0) -> Any:
    """A deep copy of parsed-JSON-like data: mappings become dicts (string keys only),
    lists and tuples become lists; ``str``/``int``/``float``/``bool``/``None`` are kept.

    Raises:
        RoomError: anything else, or nesting deeper than 100 levels.
    """
    if depth > 100:
        raise RoomError("content is nested too deeply")
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Mapping):
        copied: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise RoomError(f"content keys must be strings, got {type(key).__name__}")
            copied[key] = _json_copy(item, depth + 1)
        return copied
    if isinstance(value, list | tuple):
        return [_json_copy(item, depth + 1) for item in value]
    raise RoomError(f"content holds a {type(value).__name__}, which is not JSON")


def _localpart(user_id: str) -> str:
    return user_id[1:].partition(":")[0]


def _power_levels_content(creator: str, features: _Features) -> dict[str, Any]:
    """Synapse's ``public_chat`` power levels (``m.room.power_levels`` of the fixtures)."""
    return {
        "ban": 50,
        "events": {
            "m.call.invite": 50,
            "m.room.avatar": 50,
            "m.room.canonical_alias": 50,
            "m.room.encryption": 100,
            "m.room.history_visibility": 100,
            "m.room.name": 50,
            "m.room.power_levels": 100,
            "m.room.server_acl": 100,
            "m.room.tombstone": 150 if features.creators_outrank_power_levels else 100,
        },
        "events_default": 0,
        "historical": 100,
        "invite": 50,
        "kick": 50,
        "redact": 50,
        "state_default": 50,
        "users": {} if features.creators_outrank_power_levels else {creator: 100},
        "users_default": 0,
    }


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _local_alias(value: object, server_name: str, where: str) -> str:
    if not isinstance(value, str):
        raise RoomError(f"m.room.canonical_alias: {where} must be a room alias string")
    try:
        parsed = RoomAlias.parse(value)
    except InvalidIdentifier as e:
        raise RoomError(f"m.room.canonical_alias: {where} is not a valid room alias: {e}") from None
    if str(parsed.server_name) != server_name:
        raise RoomError(
            f"m.room.canonical_alias: {where} {value!r} is not an alias of this server "
            f"({server_name})"
        )
    return value


def canonical_aliases(content: Mapping[str, Any], server_name: str) -> list[str]:
    """The aliases an ``m.room.canonical_alias`` content claims: ``alias`` (absent, ``null``
    or ``""`` for none) then ``alt_aliases`` (absent or ``null`` for none), without
    duplicates, in that order.

    Raises:
        RoomError: ``alias`` is not a string, ``alt_aliases`` not a list, or an entry is not
            a valid room alias of ``server_name`` (the testbed cannot vouch for others).
    """
    found: list[str] = []
    alias = content.get("alias")
    if alias is not None and alias != "":
        found.append(_local_alias(alias, server_name, "'alias'"))
    alt = content.get("alt_aliases")
    if alt is not None:
        if not isinstance(alt, list):
            raise RoomError("m.room.canonical_alias: 'alt_aliases' must be a list of aliases")
        for number, item in enumerate(alt):
            checked = _local_alias(item, server_name, f"alt_aliases[{number}]")
            if checked not in found:
                found.append(checked)
    return found


@dataclass(eq=False, repr=False)
class TestbedRoom:
    """One room hosted by the testbed.

    ``events`` are the PDUs in DAG (= stream) order exactly as sent over federation: hashed
    and signed, without ``event_id`` (room versions 3+), and never modified afterwards.
    ``event_ids`` is parallel to it. Change the room only through :meth:`send` and its
    helpers, which keep the derived indexes (event ID → position, state history, auth and
    prev references as positions) in step; constructing the dataclass directly builds them
    from ``events`` and ``event_ids``.

    Every query returns the stored PDU dicts themselves (not copies): do not mutate them.

    Raises (constructor):
        RoomError: an unsupported room version, ``events``/``event_ids`` of different
            lengths, duplicate event IDs, a first event that is not ``m.room.create``, or
            ``prev_events``/``auth_events`` that do not name earlier events of the room.
    """

    #: pytest: this is not a test class, despite its name.
    __test__ = False

    room_id: str
    rules: RoomVersion
    server_name: str
    events: list[dict[str, Any]]
    event_ids: list[str]
    #: event ID → reason, for the events the authorization rules reject
    #: (:meth:`send_illegal`): in the DAG, never in the state.
    rejected: dict[str, str] = field(default_factory=dict)

    _features: _Features = field(init=False)
    #: event ID → position in ``events``.
    _index: dict[str, int] = field(init=False)
    #: per event: positions of its ``prev_events`` / ``auth_events``.
    _prev: list[tuple[int, ...]] = field(init=False)
    _auth: list[tuple[int, ...]] = field(init=False)
    #: (type, state_key) → increasing positions of the events that set it.
    _state_history: dict[tuple[str, str], list[int]] = field(init=False)
    #: (type, state_key) → position of the current state event.
    _current: dict[tuple[str, str], int] = field(init=False)

    def __post_init__(self) -> None:
        self._features = _version_features(self.rules.identifier)[1]
        if len(self.events) != len(self.event_ids):
            raise RoomError(f"{len(self.events)} events but {len(self.event_ids)} event IDs")
        self._index = {}
        self._prev = []
        self._auth = []
        self._state_history = {}
        self._current = {}
        events, event_ids = self.events, self.event_ids
        self.events, self.event_ids = [], []
        for event_id, pdu in zip(event_ids, events, strict=True):
            self._append(event_id, pdu)

    def __repr__(self) -> str:
        return (
            f"TestbedRoom(room_id={self.room_id!r}, room_version={self.rules.identifier!r}, "
            f"server_name={self.server_name!r}, events={len(self.events)})"
        )

    # --- creation -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        *,
        server_name: str,
        signing_key: SigningKey,
        room_version: str,
        creator: str,
        now_ms: int,
        history_visibility: str = "world_readable",
        join_rule: str = "public",
        alias: str | None = None,
        name: str | None = None,
        topic: str | None = None,
        encrypted: bool = False,
        initial_state: Sequence[Mapping[str, Any]] = (),
    ) -> TestbedRoom:
        """Create a room the way Synapse's ``createRoom`` does, all events sent by ``creator``
        at ``now_ms`` (ms since the epoch).

        Events, in order: ``m.room.create``; the creator's join (``displayname`` = localpart);
        ``m.room.power_levels`` (Synapse's ``public_chat`` levels); ``m.room.canonical_alias``
        (if ``alias``); ``m.room.join_rules``; ``m.room.history_visibility``; ``m.room.name``
        (if ``name``); ``m.room.topic`` (if ``topic``; plain and ``m.topic`` forms);
        ``m.room.encryption`` (``m.megolm.v1.aes-sha2``, if ``encrypted``); then each
        ``initial_state`` item ``{"type", "state_key" (default ""), "content"}``.

        Per room version:

        * v10: the create content has ``creator``; the room ID is ``!<18 random letters>:
          <server_name>``;
        * v11: no ``creator`` (rooms/v11, MSC2175: the sender is the creator); same room ID;
        * v12 (MSC4291, MSC4289): the create event has no ``room_id``; the room ID is ``!`` +
          its reference hash (URL-safe base64); no event lists the create event in
          ``auth_events``; the creator is not in the power_levels ``users``.

        A v12 room ID is a hash of the create event alone (creator, version, ``now_ms``; the
        signature is not hashed), so the same creator creating two v12 rooms in the same
        millisecond gets the same room ID: a caller that can do that (a fake clock) must
        check for an existing room or advance the clock.

        Raises:
            RoomError: a room version other than 10-12; ``creator`` is not a compliant
                user of ``server_name``; an invalid alias; a malformed ``initial_state`` item;
                content that fails the content checks of :meth:`send` (e.g. a
                ``history_visibility`` or ``join_rule`` value) or is not valid for the room
                version.
        """
        rules, features = _version_features(room_version)
        try:
            ServerName.parse(server_name)
        except InvalidIdentifier as e:
            raise RoomError(f"invalid server name: {e}") from None
        cls._check_local(creator, server_name)
        if alias is not None:
            try:
                RoomAlias.parse(alias)
            except InvalidIdentifier as e:
                raise RoomError(f"invalid alias: {e}") from None
        create_content: dict[str, Any] = {"room_version": rules.identifier}
        if features.creator_in_create_content:
            create_content = {"creator": creator, **create_content}
        create_fields: dict[str, Any] = {
            "type": "m.room.create",
            "state_key": "",
            "sender": creator,
            "content": create_content,
            "origin_server_ts": now_ms,
            "depth": 1,
            "prev_events": [],
            "auth_events": [],
        }
        if features.room_id_is_create_hash:
            create = cls._sign(create_fields, rules, server_name, signing_key)
            room_id = room_id_for_create(create, rules)
        else:
            letters = "".join(secrets.choice(string.ascii_letters) for _ in range(_ROOM_ID_LETTERS))
            room_id = f"!{letters}:{server_name}"
            create = cls._sign(
                {**create_fields, "room_id": room_id}, rules, server_name, signing_key
            )
        cls._verify(create, rules, server_name, signing_key)
        room = cls(room_id=room_id, rules=rules, server_name=server_name, events=[], event_ids=[])
        room._append(compute_event_id(create, rules), create)

        def state(type_: str, content: Mapping[str, Any], state_key: str = "") -> None:
            room.send(
                signing_key,
                sender=creator,
                type=type_,
                state_key=state_key,
                content=content,
                now_ms=now_ms,
            )

        room.join(signing_key, creator, now_ms)
        state("m.room.power_levels", _power_levels_content(creator, features))
        if alias is not None:
            state("m.room.canonical_alias", {"alias": alias})
        state("m.room.join_rules", {"join_rule": join_rule})
        state("m.room.history_visibility", {"history_visibility": history_visibility})
        if name is not None:
            state("m.room.name", {"name": name})
        if topic is not None:
            state("m.room.topic", {"m.topic": {"m.text": [{"body": topic}]}, "topic": topic})
        if encrypted:
            state("m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"})
        for number, item in enumerate(initial_state):
            if not isinstance(item, Mapping):
                raise RoomError(f"initial_state[{number}] is not an object")
            type_, state_key, content = (
                item.get("type"),
                item.get("state_key", ""),
                item.get("content"),
            )
            if not (
                isinstance(type_, str)
                and isinstance(state_key, str)
                and isinstance(content, Mapping)
            ):
                raise RoomError(
                    f"initial_state[{number}] needs a string 'type', an object 'content' "
                    "and, if given, a string 'state_key'"
                )
            state(type_, content, state_key)
        return room

    # --- sending ------------------------------------------------------------------------

    def send(
        self,
        signing_key: SigningKey,
        *,
        sender: str,
        type: str,
        content: Mapping[str, Any],
        now_ms: int,
        state_key: str | None = None,
        prev_events: Sequence[str] | None = None,
        origin: str | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """Create, hash (SSAPI §Calculating the content hash) and sign (APPX §Signing
        Events) the next event, append it and return ``(event_id, pdu)``.

        ``origin`` (default: this room's server) is the server whose user sends it and
        whose key ``signing_key`` is: another server's user is simulated that way.

        * ``prev_events`` default to ``[newest event ID]`` (a linear DAG), plus the newest
          accepted event's ID when the newest event is one the auth rules reject
          (:meth:`send_illegal`); ``depth`` is the largest depth among them + 1;
          ``origin_server_ts`` is ``now_ms``. No top-level ``origin`` (Synapse sends none,
          not even in v10).
        * ``auth_events`` follow the spec's auth events selection (SSAPI §Auth events
          selection, :func:`~peekproxy.core.auth_rules.auth_types_for_event`), taken from
          the current state, in Synapse's order: the create event (not in v12), the power
          levels, the sender's member event, and for ``m.room.member`` the target's member
          event, the join rules (membership ``join``/``invite``/``knock``), then the
          ``m.room.third_party_invite`` named by ``third_party_invite.signed.token`` and
          the member event of ``join_authorised_via_users_server`` (each if it exists).
        * The new PDU must pass :func:`~peekproxy.core.pdu.check_pdu` with the key's
          public half ("accept"), so a float, an out-of-range integer or an oversized event
          is refused here rather than by the peers.

        Who may send: ``sender`` must be a user of ``origin``, and the event must pass the
        room version's authorization rules against the room's current state
        (:func:`~peekproxy.core.auth_rules.check_against_state`, the code peekproxy judges
        received PDUs with): membership changes, power levels, send levels, and so on.

        The testbed's own content checks (state events) come first: an ``m.room.member``
        needs a ``state_key`` that is a user ID (compliant when local);
        ``history_visibility`` one of :data:`HISTORY_VISIBILITIES`; ``join_rule`` one of
        :data:`JOIN_RULES`; ``m.room.canonical_alias`` as :func:`canonical_aliases` checks
        it; ``m.room.power_levels`` with a ``users`` object that keeps every creator at 100
        or more (v10/v11). Senders must be compliant local user IDs.

        Raises:
            RoomError: the sender is not a valid local user, ``m.room.create`` is sent
                again, a membership event lacks a ``state_key``, ``content`` is not JSON,
                fails the content checks above or is not valid for the room version, the
                authorization rules refuse the event ("the room's authorization rules
                refuse it: <reason>"), ``now_ms`` is not a non-negative integer, or
                ``prev_events`` is empty or names unknown events
                (:class:`UnknownEventError`).
        """
        return self._send(
            signing_key,
            sender=sender,
            type=type,
            content=content,
            now_ms=now_ms,
            state_key=state_key,
            prev_events=prev_events,
            origin=origin,
        )

    def join(
        self, signing_key: SigningKey, user: str, now_ms: int, *, origin: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """``user`` joins (``{"displayname": <localpart>, "membership": "join"}``); see
        :meth:`send` for the rules, errors and ``origin``."""
        content = {"displayname": _localpart(user), "membership": "join"}
        return self.send(
            signing_key,
            sender=user,
            type=_MEMBER,
            state_key=user,
            content=content,
            now_ms=now_ms,
            origin=origin,
        )

    def leave(
        self, signing_key: SigningKey, user: str, now_ms: int, *, origin: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """``user`` leaves (``{"membership": "leave"}``); see :meth:`send`."""
        return self.send(
            signing_key,
            sender=user,
            type=_MEMBER,
            state_key=user,
            content={"membership": "leave"},
            now_ms=now_ms,
            origin=origin,
        )

    def redact_event(
        self,
        signing_key: SigningKey,
        *,
        sender: str,
        event_id: str,
        now_ms: int,
        reason: str | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """Send an ``m.room.redaction`` of ``event_id``: ``redacts`` at the top level in v10,
        in ``content`` from v11 (MSC2174). The redacted event itself stays stored as it was.

        Raises:
            UnknownEventError: ``event_id`` is not an event of this room.
            RoomError: as :meth:`send`.
        """
        if event_id not in self._index:
            raise UnknownEventError(f"unknown event {event_id}")
        content: dict[str, Any] = {} if reason is None else {"reason": reason}
        extra: dict[str, Any] = {}
        if self._features.redacts_in_content:
            content["redacts"] = event_id
        else:
            extra["redacts"] = event_id
        return self._send(
            signing_key,
            sender=sender,
            type="m.room.redaction",
            content=content,
            now_ms=now_ms,
            extra=extra,
        )

    def _send(
        self,
        signing_key: SigningKey,
        *,
        sender: str,
        type: str,
        content: Mapping[str, Any],
        now_ms: int,
        state_key: str | None = None,
        prev_events: Sequence[str] | None = None,
        extra: Mapping[str, Any] | None = None,
        origin: str | None = None,
        illegal: bool = False,
        cite_create: bool = False,
    ) -> tuple[str, dict[str, Any]]:
        if not self.events:
            raise RoomError("the room has no create event")
        origin = origin or self.server_name
        self._check_local(sender, origin)
        if not isinstance(type, str) or not type:
            raise RoomError("'type' must be a non-empty string")
        if type == "m.room.create":
            raise RoomError("a room has exactly one m.room.create event")
        if state_key is not None and not isinstance(state_key, str):
            raise RoomError("'state_key' must be a string")
        if type == _MEMBER and state_key is None:
            raise RoomError("an m.room.member event needs a state_key")
        if not isinstance(content, Mapping):
            raise RoomError("'content' must be an object")
        if not isinstance(now_ms, int) or isinstance(now_ms, bool) or now_ms < 0:
            raise RoomError("now_ms must be a non-negative integer")
        body: dict[str, Any] = _json_copy(content)
        self._check_content(type, state_key, body)

        prev = self._prev_events(prev_events)
        fields: dict[str, Any] = {
            "type": type,
            "room_id": self.room_id,
            "sender": sender,
            "content": body,
            "origin_server_ts": now_ms,
            "depth": max(self.events[self._index[e]]["depth"] for e in prev) + 1,
            "prev_events": prev,
            **(extra or {}),
        }
        if state_key is not None:
            fields["state_key"] = state_key
        fields["auth_events"] = self._select_auth_events(fields)
        if cite_create:
            fields["auth_events"].insert(0, self.event_ids[0])
        pdu = self._sign(fields, self.rules, origin, signing_key)
        event_id = self._verify(pdu, self.rules, origin, signing_key)
        if illegal:
            reason = self._own_auth_events_verdict(event_id, pdu) or self._state_verdict(
                event_id, pdu
            )
            if reason is None:
                raise RoomError(
                    "the room's authorization rules allow this event: it is not illegal"
                )
            self.rejected[event_id] = reason
        else:
            reason = self._state_verdict(event_id, pdu)
            if reason is not None:
                raise RoomError(f"the room's authorization rules refuse it: {reason}")
        self._append(event_id, pdu)
        return event_id, pdu

    def send_illegal(
        self,
        signing_key: SigningKey,
        *,
        sender: str,
        type: str,
        content: Mapping[str, Any],
        now_ms: int,
        state_key: str | None = None,
        cite_create: bool = False,
    ) -> tuple[str, dict[str, Any], str]:
        """Make an event the authorization rules reject, as a buggy or malicious server
        would: created, hashed and signed like any other (so it passes receipt steps 1-3;
        only the auth rules catch it), appended to the DAG, but recorded in
        :attr:`rejected` and kept out of the state, the auth chains and :meth:`latest`.
        ``cite_create`` (room version 12) also lists the create event in its
        ``auth_events``, which MSC4291 forbids.

        The next events' default ``prev_events`` name it *and* the newest accepted event
        (see :meth:`send`), so a receiver that rejects it still holds a known parent.

        Returns:
            ``(event_id, pdu, reason)``: the reason is the auth rules' verdict (receipt step
            4, the event's own ``auth_events``, else step 5, the current state).

        Raises:
            RoomError: as :meth:`send` for everything but the auth rules; also when the auth
                rules *allow* the event.
        """
        event_id, pdu = self._send(
            signing_key,
            sender=sender,
            type=type,
            content=content,
            now_ms=now_ms,
            state_key=state_key,
            illegal=True,
            cite_create=cite_create,
        )
        return event_id, pdu, self.rejected[event_id]

    def _prev_events(self, given: Sequence[str] | None) -> list[str]:
        """``given``, checked, or by default the newest event, plus the newest accepted
        event when the newest one is rejected (:meth:`send_illegal`)."""
        if given is None:
            prev = [self.event_ids[-1]]
            accepted = self.latest()[0]
            return prev if accepted in prev else [*prev, accepted]
        prev = list(given)
        if not prev:
            raise RoomError("prev_events must not be empty")
        if len(set(prev)) != len(prev):
            raise RoomError("prev_events has duplicates")
        for event_id in prev:
            if not isinstance(event_id, str) or event_id not in self._index:
                raise UnknownEventError(f"prev_events: unknown event {event_id!r}")
        return prev

    def _current_state_map(self) -> dict[StateKey, dict[str, Any]]:
        return {key: self.events[position] for key, position in self._current.items()}

    def _state_verdict(self, event_id: str, pdu: Mapping[str, Any]) -> str | None:
        """The auth rules against the current state (receipt steps 5/6)."""
        return check_against_state(event_id, pdu, self._current_state_map(), self.rules)

    def _own_auth_events_verdict(self, event_id: str, pdu: Mapping[str, Any]) -> str | None:
        """The auth rules against the event's own ``auth_events`` (receipt step 4)."""
        cited = {ref: self.events[self._index[ref]] for ref in pdu["auth_events"]}
        if self._features.room_id_is_create_hash:
            cited[create_event_id(self.room_id)] = self.events[0]
        return check_event_auth(event_id, pdu, cited, self.rules, rejected=self.rejected)

    @staticmethod
    def _check_local(user: object, server_name: str) -> None:
        if not isinstance(user, str):
            raise RoomError("the sender must be a user ID string")
        try:
            parsed = UserId.parse(user)
        except InvalidIdentifier as e:
            raise RoomError(f"invalid sender: {e}") from None
        if user.partition(":")[2] != server_name:
            raise RoomError(f"{user} is not a user of this server ({server_name})")
        if not parsed.is_compliant:
            raise RoomError(
                f"invalid sender {user!r}: a local user ID's localpart may only use "
                "a-z 0-9 . _ = - / +"
            )

    def _check_content(self, type: str, state_key: str | None, content: Mapping[str, Any]) -> None:
        """The testbed's own content checks, beyond the auth rules: values that would break
        the room for the testbed or that peers refuse to show (see :meth:`send`)."""
        if state_key is None:
            return
        if type == _MEMBER:
            try:
                target = UserId.parse(state_key)
            except InvalidIdentifier as e:
                raise RoomError(f"an m.room.member state_key must be a user ID: {e}") from None
            if str(target.server_name) == self.server_name and not target.is_compliant:
                raise RoomError(
                    f"{state_key!r} is not a valid local user ID: the localpart may only use "
                    "a-z 0-9 . _ = - / +"
                )
            return
        if state_key != "":
            return
        if type == _HISTORY_VISIBILITY[0]:
            value = content.get("history_visibility")
            if value not in HISTORY_VISIBILITIES:
                raise RoomError(
                    f"history_visibility must be one of {', '.join(HISTORY_VISIBILITIES)}, "
                    f"not {value!r}"
                )
        elif type == _JOIN_RULES[0]:
            value = content.get("join_rule")
            if value not in JOIN_RULES:
                raise RoomError(f"join_rule must be one of {', '.join(JOIN_RULES)}, not {value!r}")
        elif type == _CANONICAL_ALIAS[0]:
            canonical_aliases(content, self.server_name)
        elif type == _POWER_LEVELS[0]:
            self._check_creator_power(content)

    def _check_creator_power(self, content: Mapping[str, Any]) -> None:
        """v10/v11: the creator keeps at least 100 (through ``users`` or ``users_default``),
        so that the testbed can still send everything its admin API offers. The auth rules
        check the rest (integer levels, user-ID keys, v12 creators not in ``users``)."""
        users = content.get("users", {})
        if not isinstance(users, Mapping):
            raise RoomError(
                "m.room.power_levels: 'users' must be an object of user IDs to integers"
            )
        if self._features.creators_outrank_power_levels:
            return
        for creator in self.creators():
            level = users.get(creator, content.get("users_default", 0))
            if _is_int(level) and level < _CREATOR_POWER:
                raise RoomError(
                    f"m.room.power_levels: would take the creator {creator} to power level "
                    f"{level}; the creator must keep at least {_CREATOR_POWER}"
                )

    def _select_auth_events(self, event: Mapping[str, Any]) -> list[str]:
        """SSAPI §Auth events selection (:func:`~peekproxy.core.auth_rules.auth_types_for_event`)
        over the current state, in Synapse's order (:data:`_AUTH_ORDER`)."""
        sender, target = event["sender"], event.get("state_key")
        order = {**_AUTH_ORDER, (_MEMBER, sender): 2}
        if event["type"] == _MEMBER:
            order.setdefault((_MEMBER, target), 3)
        implied = self.rules.auth.create_event_implied  # v12: never cited (MSC4291)
        chosen = sorted(
            (order.get(key, 5), position)
            for key in auth_types_for_event(event, self.rules)
            if (position := self._current.get(key)) is not None
            and not (implied and key == ("m.room.create", ""))
        )
        return [self.event_ids[position] for _, position in chosen]

    @staticmethod
    def _sign(
        fields: Mapping[str, Any], rules: RoomVersion, server_name: str, signing_key: SigningKey
    ) -> dict[str, Any]:
        """Add ``hashes.sha256`` and this server's signature over the redacted event; keys
        sorted, as the fixtures show them.

        Raises:
            RoomError: the event cannot be encoded as canonical JSON.
        """
        try:
            return sign_event(fields, rules, server_name, signing_key)
        except (ValueError, TypeError, RecursionError) as e:
            raise RoomError(f"the event cannot be encoded as canonical JSON: {e}") from None

    @staticmethod
    def _verify(
        pdu: Mapping[str, Any], rules: RoomVersion, server_name: str, signing_key: SigningKey
    ) -> str:
        """Run the receipt checks a peer will run; return the event ID.

        Raises:
            RoomError: the PDU is not accepted (e.g. not strict canonical JSON, too big).
        """
        key_id = f"{signing_key.alg}:{signing_key.version}"
        keys = key_table({(server_name, key_id): VerifyKeyInfo(get_verify_key(signing_key))})
        verdict = check_pdu(pdu, rules, keys)
        if verdict.outcome != "accept" or verdict.event_id is None:
            raise RoomError(f"the event would not be accepted by peers: {verdict.reason}")
        return verdict.event_id

    def _append(self, event_id: str, pdu: dict[str, Any]) -> None:
        """Add a PDU at the end and update the indexes.

        Raises:
            RoomError: see the class docstring.
        """
        position = len(self.events)
        where = f"event {position} ({event_id})"
        if event_id in self._index:
            raise RoomError(f"{where}: duplicate event ID")
        is_create = (pdu.get("type"), pdu.get("state_key")) == _CREATE
        if is_create != (position == 0):
            raise RoomError(f"{where}: the m.room.create event must come first, and only once")
        refs: list[tuple[int, ...]] = []
        for key in ("prev_events", "auth_events"):
            ids = pdu.get(key)
            if not isinstance(ids, list):
                raise RoomError(f"{where}: {key!r} is not a list")
            found = []
            for ref in ids:
                earlier = self._index.get(ref) if isinstance(ref, str) else None
                if earlier is None:
                    raise RoomError(f"{where}: {key} names {ref!r}, not an earlier event")
                found.append(earlier)
            refs.append(tuple(found))
        if not isinstance(pdu.get("depth"), int):
            raise RoomError(f"{where}: 'depth' is not an integer")
        if position > 0 and not refs[0]:
            raise RoomError(f"{where}: no prev_events")
        self.events.append(pdu)
        self.event_ids.append(event_id)
        self._index[event_id] = position
        self._prev.append(refs[0])
        self._auth.append(refs[1])
        state_key = pdu.get("state_key")
        if event_id in self.rejected:
            return
        if isinstance(state_key, str) and isinstance(pdu.get("type"), str):
            state = (pdu["type"], state_key)
            self._state_history.setdefault(state, []).append(position)
            self._current[state] = position

    # --- queries ------------------------------------------------------------------------

    def latest(self) -> tuple[str, dict[str, Any]]:
        """The newest accepted event (not one of :attr:`rejected`) as ``(event_id, pdu)``."""
        position = len(self.events) - 1
        while self.event_ids[position] in self.rejected:
            position -= 1
        return self.event_ids[position], self.events[position]

    def event(self, event_id: str) -> dict[str, Any] | None:
        """The PDU with that ID, or ``None``."""
        position = self._index.get(event_id)
        return None if position is None else self.events[position]

    def index_of(self, event_id: str) -> int | None:
        """The event's position in :attr:`events` (0 = create), or ``None``."""
        return self._index.get(event_id)

    def state_event(self, type: str, state_key: str = "") -> dict[str, Any] | None:
        """The current state event ``(type, state_key)``, or ``None``."""
        position = self._current.get((type, state_key))
        return None if position is None else self.events[position]

    def current_state(self) -> list[dict[str, Any]]:
        """The state after the latest event: one PDU per ``(type, state_key)``, in DAG
        order."""
        return [self.events[p] for p in sorted(self._current.values())]

    def _state_positions(self, event_id: str) -> list[int]:
        position = self._index.get(event_id)
        if position is None:
            raise UnknownEventError(f"unknown event {event_id}")
        found = []
        for history in self._state_history.values():
            at = bisect.bisect_right(history, position)
            if at:
                found.append(history[at - 1])
        found.sort()
        return found

    def state_at(self, event_id: str) -> list[dict[str, Any]]:
        """The state *after* ``event_id`` (including it if it is a state event), in DAG
        order; the fold over events in stream order, as the rooms are linear.
        O(K log n) for K state keys.

        Raises:
            UnknownEventError: not an event of this room.
        """
        return [self.events[p] for p in self._state_positions(event_id)]

    def state_ids_at(self, event_id: str) -> list[str]:
        """The event IDs of :meth:`state_at`.

        Raises:
            UnknownEventError: not an event of this room.
        """
        return [self.event_ids[p] for p in self._state_positions(event_id)]

    def _auth_chain_positions(self, pdus: Iterable[Mapping[str, Any]]) -> list[int]:
        seen: set[int] = set()
        todo: list[int] = []
        implicit_create = False
        for pdu in pdus:
            if pdu.get("type") != "m.room.create":
                implicit_create = True
            refs = pdu.get("auth_events")
            for ref in refs if isinstance(refs, list) else ():
                position = self._index.get(ref) if isinstance(ref, str) else None
                if position is not None and position not in seen:
                    seen.add(position)
                    todo.append(position)
        if implicit_create and self._features.room_id_is_create_hash and self.events:
            seen.add(0)
        while todo:
            for position in self._auth[todo.pop()]:
                if position not in seen:
                    seen.add(position)
                    todo.append(position)
        return sorted(seen)

    def auth_chain(self, pdus: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Every event reachable from ``pdus`` through ``auth_events``, transitively, in DAG
        order; in v12 also the create event, which every other event references implicitly
        (MSC4291). A given PDU is in the result only if another one reaches it (the
        convention of ``peek-response-v12.json``, as Synapse's ``send_join``). Unknown
        event IDs in ``auth_events`` are skipped.
        """
        return [self.events[p] for p in self._auth_chain_positions(pdus)]

    def auth_chain_ids(self, pdus: Iterable[Mapping[str, Any]]) -> list[str]:
        """The event IDs of :meth:`auth_chain`."""
        return [self.event_ids[p] for p in self._auth_chain_positions(pdus)]

    def _state_content(self, key: tuple[str, str], name: str) -> object:
        position = self._current.get(key)
        if position is None:
            return None
        content = self.events[position].get("content")
        return content.get(name) if isinstance(content, Mapping) else None

    def history_visibility(self) -> str | None:
        """The current ``m.room.history_visibility``, or ``None`` without one (or if it is
        not a string)."""
        value = self._state_content(_HISTORY_VISIBILITY, "history_visibility")
        return value if isinstance(value, str) else None

    def is_world_readable(self) -> bool:
        """True when the history visibility is ``world_readable``."""
        return self.history_visibility() == "world_readable"

    def is_encrypted(self) -> bool:
        """True once the room has an ``m.room.encryption`` state event (it cannot be
        turned off)."""
        return _ENCRYPTION in self._current

    def join_rule(self) -> str | None:
        """The current ``join_rule``, or ``None`` without an ``m.room.join_rules`` event."""
        value = self._state_content(_JOIN_RULES, "join_rule")
        return value if isinstance(value, str) else None

    def membership(self, user: str) -> str | None:
        """``user``'s current membership (``join``, ``leave``, ``invite``, ``ban``,
        ``knock``), or ``None`` if they never had one."""
        value = self._state_content((_MEMBER, user), "membership")
        return value if isinstance(value, str) else None

    def joined_users(self) -> list[str]:
        """The users whose membership is ``join``, in the DAG order of their current member
        events."""
        return [
            key[1]
            for key, position in sorted(self._current.items(), key=lambda item: item[1])
            if key[0] == _MEMBER and self.membership(key[1]) == "join"
        ]

    def canonical_alias(self) -> str | None:
        """The current ``m.room.canonical_alias`` ``alias``, or ``None`` (also for ``""``)."""
        value = self._state_content(_CANONICAL_ALIAS, "alias")
        return value if isinstance(value, str) and value else None

    def local_aliases(self) -> list[str]:
        """Every alias the current ``m.room.canonical_alias`` claims (``alias``, then
        ``alt_aliases``) that is a valid alias of this server, without duplicates. Entries
        that are not are skipped (a room saved before they were checked)."""
        position = self._current.get(_CANONICAL_ALIAS)
        content = None if position is None else self.events[position].get("content")
        if not isinstance(content, Mapping):
            return []
        alt = content.get("alt_aliases")
        candidates = [content.get("alias"), *(alt if isinstance(alt, list) else [])]
        found: list[str] = []
        for candidate in candidates:
            try:
                alias = _local_alias(candidate, self.server_name, "alias")
            except RoomError:
                continue
            if alias not in found:
                found.append(alias)
        return found

    def creators(self) -> list[str]:
        """The room's creators: the create event's ``creator`` (v10) or sender (v11), plus
        ``additional_creators`` in v12 (MSC4289)."""
        create = self.events[0]
        content = create.get("content")
        content = content if isinstance(content, Mapping) else {}
        first = content.get("creator") if self._features.creator_in_create_content else None
        found = [first if isinstance(first, str) else create.get("sender")]
        if self._features.creators_outrank_power_levels:
            extra = content.get("additional_creators")
            found += extra if isinstance(extra, list) else []
        return [c for i, c in enumerate(found) if isinstance(c, str) and c not in found[:i]]

    def server_acl_allows(self, server_name: str) -> bool:
        """Whether the room's ``m.room.server_acl`` lets ``server_name`` in (CSAPI
        §Server Access Control Lists; the rules, in the order Synapse applies them, are
        :func:`peekproxy.core.server_acl.server_allowed`'s). No ACL event: allowed."""
        position = self._current.get(_SERVER_ACL)
        if position is None:
            return True
        content = self.events[position].get("content")
        return server_allowed(content if isinstance(content, Mapping) else {}, server_name)

    def backfill(self, from_event_ids: Sequence[str], limit: int) -> list[dict[str, Any]]:
        """SSAPI ``GET /backfill``: the given events and their ancestors through
        ``prev_events``, newest first (highest depth, then latest in stream order), at most
        ``limit``. Unknown IDs are skipped; no known ID or ``limit`` ≤ 0 gives ``[]``.
        """
        if limit <= 0:
            return []
        heap: list[tuple[int, int]] = []
        seen: set[int] = set()
        for event_id in from_event_ids:
            position = self._index.get(event_id) if isinstance(event_id, str) else None
            if position is not None and position not in seen:
                seen.add(position)
                heapq.heappush(heap, (-self.events[position]["depth"], -position))
        result: list[dict[str, Any]] = []
        while heap and len(result) < limit:
            _, negative = heapq.heappop(heap)
            position = -negative
            result.append(self.events[position])
            for prev in self._prev[position]:
                if prev not in seen:
                    seen.add(prev)
                    heapq.heappush(heap, (-self.events[prev]["depth"], -prev))
        return result

    def _ancestors(self, starts: Iterable[int], stop: set[int] | frozenset[int]) -> set[int]:
        """Positions reachable from ``starts`` through ``prev_events`` (``starts``
        included), not entering ``stop``."""
        found: set[int] = set()
        todo = [p for p in starts if p not in stop]
        found.update(todo)
        while todo:
            for prev in self._prev[todo.pop()]:
                if prev not in found and prev not in stop:
                    found.add(prev)
                    todo.append(prev)
        return found

    def missing_events(
        self, earliest: Sequence[str], latest: Sequence[str], limit: int, min_depth: int
    ) -> list[dict[str, Any]]:
        """SSAPI ``POST /get_missing_events``: the ancestors of ``latest`` (through
        ``prev_events``; the ``latest`` events themselves excluded) that are neither in
        ``earliest`` nor ancestors of it, with ``depth`` ≥ ``min_depth``; oldest first,
        at most ``limit`` (the newest ones when cut). Unknown IDs are skipped.
        """
        if limit <= 0:
            return []
        earliest_known = [
            self._index[e] for e in earliest if isinstance(e, str) and e in self._index
        ]
        latest_known = {self._index[e] for e in latest if isinstance(e, str) and e in self._index}
        excluded = frozenset(self._ancestors(earliest_known, frozenset()))
        parents = [prev for position in latest_known for prev in self._prev[position]]
        wanted = self._ancestors(parents, excluded) - latest_known
        chosen = sorted(p for p in wanted if self.events[p]["depth"] >= min_depth)
        return [self.events[p] for p in chosen[-limit:]]

    # --- persistence --------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """``{"room_id", "room_version", "server_name", "events": [PDU, ...]}``, plus
        ``"rejected": {event_id: reason}`` when the room holds events the auth rules reject
        (:meth:`send_illegal`); a deep copy that ``json.dumps`` can write and
        :meth:`from_json` reads back."""
        saved: dict[str, Any] = {
            "room_id": self.room_id,
            "room_version": self.rules.identifier,
            "server_name": self.server_name,
            "events": copy.deepcopy(self.events),
        }
        if self.rejected:
            saved["rejected"] = dict(self.rejected)
        return saved

    @classmethod
    def from_json(
        cls,
        data: Mapping[str, Any],
        *,
        server_name: str | None = None,
        signing_key: SigningKey | None = None,
        remote_keys: Mapping[str, SigningKey] | None = None,
    ) -> TestbedRoom:
        """Rebuild a room saved by :meth:`to_json`: event IDs are recomputed (reference
        hashes), the indexes and state rebuilt. The PDUs are copied. ``remote_keys``: the
        keys of simulated remote servers (server name → key), for their users' events.

        Checks, each failing with :class:`RoomError`: the fields and their types; the saved
        ``server_name`` is ``server_name`` (when given: a room of another server's data
        directory); a supported room version; the first event is ``m.room.create`` with
        that ``room_version``; the room ID (v12: the create event's hash, which has no
        ``room_id``; before: every event's ``room_id``); every content hash; with
        ``signing_key``, every event passes the receipt checks a peer runs
        (:func:`~peekproxy.core.pdu.check_pdu` with that key's public half, so also
        the signatures); unique event IDs; ``prev_events``/``auth_events`` naming earlier
        events.
        """
        if not isinstance(data, Mapping):
            raise RoomError("a saved room must be an object")
        room_id, version, saved_server, events = (
            data.get("room_id"),
            data.get("room_version"),
            data.get("server_name"),
            data.get("events"),
        )
        rejected = data.get("rejected", {})
        if not (
            isinstance(room_id, str)
            and isinstance(version, str)
            and isinstance(saved_server, str)
            and isinstance(events, list)
        ):
            raise RoomError(
                "a saved room needs string room_id, room_version, server_name and a list events"
            )
        if not isinstance(rejected, Mapping) or not all(
            isinstance(reason, str) for reason in rejected.values()
        ):
            raise RoomError("'rejected' must map event IDs to reasons")
        if server_name is not None and saved_server != server_name:
            raise RoomError(
                f"the room {room_id} belongs to server {saved_server!r}, not {server_name!r} "
                "(is this another testbed's data directory?)"
            )
        rules, features = _version_features(version)
        if not events:
            raise RoomError("a saved room needs at least the m.room.create event")
        keys = None
        key_id = ""
        if signing_key is not None:
            key_id = f"{signing_key.alg}:{signing_key.version}"
            keys = key_table(
                {
                    (server, f"{key.alg}:{key.version}"): VerifyKeyInfo(get_verify_key(key))
                    for server, key in {**(remote_keys or {}), saved_server: signing_key}.items()
                }
            )
        pdus: list[dict[str, Any]] = []
        event_ids: list[str] = []
        for position, raw in enumerate(events):
            if not isinstance(raw, Mapping):
                raise RoomError(f"event {position} is not an object")
            pdu: dict[str, Any] = _json_copy(raw)
            try:
                event_id = compute_event_id(pdu, rules)
                digest = encode_base64(content_hash(pdu))
            except (ValueError, TypeError, RecursionError) as e:
                raise RoomError(f"event {position} cannot be hashed: {e}") from None
            hashes = pdu.get("hashes")
            if not isinstance(hashes, Mapping) or hashes.get("sha256") != digest:
                raise RoomError(f"event {position} ({event_id}): content hash mismatch")
            if keys is not None:
                verdict = check_pdu(pdu, rules, keys)
                if verdict.outcome != "accept":
                    hint = ""
                    if "signature" in verdict.reason.lower():
                        hint = f" (signed with another key than {key_id}?)"
                    raise RoomError(
                        f"event {position} ({event_id}) fails the checks peers run: "
                        f"{verdict.reason}{hint}"
                    )
            if position == 0:
                content = pdu.get("content")
                if pdu.get("type") != "m.room.create" or not isinstance(content, Mapping):
                    raise RoomError("event 0 is not an m.room.create event")
                if content.get("room_version") != version:
                    raise RoomError(
                        f"the create event says room version {content.get('room_version')!r}, "
                        f"the room {version!r}"
                    )
            if position == 0 and features.room_id_is_create_hash:
                try:
                    derived = room_id_for_create(pdu, rules)
                except ValueError as e:
                    raise RoomError(f"event 0: {e}") from None
                if derived != room_id:
                    raise RoomError(f"the create event founds {derived}, not {room_id}")
            elif pdu.get("room_id") != room_id:
                raise RoomError(f"event {position} ({event_id}) is not in {room_id}")
            pdus.append(pdu)
            event_ids.append(event_id)
        return cls(
            room_id=room_id,
            rules=rules,
            server_name=saved_server,
            events=pdus,
            event_ids=event_ids,
            rejected={e: reason for e, reason in rejected.items() if e in event_ids},
        )

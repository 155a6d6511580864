"""The observer's own membership events, and what a ``send_join`` answer tells.

Pure: no I/O. Used by :mod:`peekproxy.services.observer_join`.

* :func:`sign_event`: ``hashes.sha256`` and our signature over the redacted event
  (SSAPI §Signing events; the testbed signs its events with it too);
* :func:`membership_event`: our join or leave, built from the template a
  ``make_join`` / ``make_leave`` answer holds (SSAPI §Joining Rooms, §Leaving Rooms);
* :func:`joined_room`: the room as it stands after our join, from the ``send_join`` (v2)
  answer, checked as an MSC2444 peek answer is
  (:func:`~peekproxy.core.validation.validate_peek_response`);
* :class:`JoinHolds`: rooms not to be joined again for a while after a join that had to
  be undone;
* :func:`check_summary`: whether the room's summary (``GET /hierarchy/{roomId}``, SSAPI
  §Spaces) lets us join it at all.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from signedjson.sign import sign_json
from signedjson.types import SigningKey
from unpaddedbase64 import encode_base64

from peekproxy.core.backoff import backoff_delay
from peekproxy.core.events import compute_event_id, content_hash, redact
from peekproxy.core.pdu_signatures import KeyLookup
from peekproxy.core.room_versions import EventIdFormat, RoomVersion
from peekproxy.core.room_versions import room_version as rules_of
from peekproxy.core.validation import (
    InvalidPeekResponse,
    RoomNotPeekable,
    ValidatedPeek,
    validate_peek_response,
)

__all__ = [
    "JOIN_HOLD_MS",
    "MAX_HELD_ROOMS",
    "InvalidTemplate",
    "JoinHolds",
    "check_summary",
    "joined_room",
    "membership_event",
    "sign_event",
    "template_room_version",
]


class InvalidTemplate(InvalidPeekResponse):
    """A ``make_join`` / ``make_leave`` answer that cannot be used (the message says why)."""


def sign_event(
    fields: Mapping[str, Any], rules: RoomVersion, server_name: str, signing_key: SigningKey
) -> dict[str, Any]:
    """``fields`` plus ``hashes.sha256`` (the content hash) and ``server_name``'s signature
    over the redacted event, keys sorted.

    Raises:
        ValueError, TypeError, RecursionError: the event is not canonical JSON.
    """
    pdu = dict(fields)
    pdu.pop("signatures", None)
    pdu.pop("unsigned", None)
    pdu["hashes"] = {"sha256": encode_base64(content_hash(pdu))}
    signed = sign_json(redact(pdu, rules), server_name, signing_key)
    pdu["signatures"] = signed["signatures"]
    return dict(sorted(pdu.items()))


def template_room_version(answer: Any, supported: Collection[str]) -> str:
    """The ``room_version`` of a ``make_join`` / ``make_leave`` answer (absent: ``"1"``, as
    SSAPI says for servers that predate it).

    Raises:
        InvalidTemplate: not an object, no ``event`` object, or a version not in
            ``supported``.
    """
    if not isinstance(answer, Mapping) or not isinstance(answer.get("event"), Mapping):
        raise InvalidTemplate("the answer has no event template")
    version = answer.get("room_version", "1")
    if not isinstance(version, str) or version not in supported:
        raise InvalidTemplate(f"room version {str(version)[:40]!r} is not one we support")
    return version


def membership_event(
    answer: Mapping[str, Any],
    *,
    room_id: str,
    user_id: str,
    membership: str,
    server_name: str,
    signing_key: SigningKey,
    now_ms: int,
    displayname: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Our ``m.room.member`` event of ``user_id`` (``membership``: ``join`` or ``leave``),
    built from the template of a ``make_join`` / ``make_leave`` answer (checked with
    :func:`template_room_version` first), signed by ``server_name``.

    The template's ``auth_events``, ``prev_events`` and ``depth`` are kept; ``origin_server_ts``
    is ``now_ms`` (ms); ``content`` is ``{"membership"}`` plus ``displayname`` for a join.
    Rooms v1/v2 take a fresh ``$<random>:<server_name>`` event ID (rooms/v1 §Event IDs).

    Returns:
        (event ID, signed PDU).

    Raises:
        InvalidTemplate: the template is for another room, user, event type or membership,
            lacks ``auth_events`` / ``prev_events`` lists or an integer ``depth``, or cannot
            be encoded.
    """
    template = answer["event"]
    rules = rules_of(str(answer.get("room_version", "1")))
    checks = {
        "room_id": room_id,
        "type": "m.room.member",
        "sender": user_id,
        "state_key": user_id,
    }
    for key, expected in checks.items():
        if template.get(key) != expected and not (key == "room_id" and key not in template):
            raise InvalidTemplate(f"the template's {key} is {str(template.get(key))[:80]!r}")
    content = template.get("content")
    if not isinstance(content, Mapping) or content.get("membership") != membership:
        raise InvalidTemplate(f"the template is not a {membership} event")
    for key in ("auth_events", "prev_events"):
        if not isinstance(template.get(key), list):
            raise InvalidTemplate(f"the template has no {key} list")
    depth = template.get("depth")
    if not isinstance(depth, int) or isinstance(depth, bool):
        raise InvalidTemplate("the template has no integer depth")
    fields: dict[str, Any] = {
        k: v for k, v in template.items() if k not in ("signatures", "hashes", "unsigned")
    }
    fields["room_id"] = room_id
    fields["origin_server_ts"] = now_ms
    fields["content"] = {"membership": membership}
    if membership == "join" and displayname:
        fields["content"]["displayname"] = displayname
    if rules.event_id_format is EventIdFormat.EVENT_ID_FIELD:
        fields["event_id"] = f"${secrets.token_urlsafe(18)}:{server_name}"
        fields["origin"] = server_name
    try:
        pdu = sign_event(fields, rules, server_name, signing_key)
        return compute_event_id(pdu, rules), pdu
    except (ValueError, TypeError, RecursionError) as e:
        raise InvalidTemplate(f"the event cannot be encoded: {e}") from None


def joined_room(
    answer: Any,
    *,
    room_id: str,
    room_version: str,
    join_event_id: str,
    join_event: Mapping[str, Any],
    keys: KeyLookup,
) -> ValidatedPeek:
    """The room after our join, from the ``send_join`` v2 answer (``{"state": [PDU],
    "auth_chain": [PDU], "event": PDU, "members_omitted": bool}``; SSAPI §Joining Rooms).

    ``state`` is the state *before* our join: the result's state is that with our
    ``join_event`` (the event we signed, not the echo) in place of any earlier membership of
    ours; its latest event is our join. Every PDU is checked as in an MSC2444 peek answer
    (:func:`~peekproxy.core.validation.validate_peek_response`; ``keys`` must hold the
    signers' keys, ours included). ``renewal_interval_ms`` of the result means nothing.

    Raises:
        InvalidPeekResponse: the answer is malformed, a PDU fails its checks, or
            ``members_omitted`` is true (we ask for the full state).
        RoomNotPeekable: (a subclass) the state shows a room that is not world_readable
            or is encrypted: the caller leaves at once.
    """
    if not isinstance(answer, Mapping):
        raise InvalidPeekResponse("the send_join answer is not a JSON object")
    if answer.get("members_omitted") is True:
        raise InvalidPeekResponse("the send_join answer omitted members (partial state)")
    state = answer.get("state")
    if not isinstance(state, list):
        raise InvalidPeekResponse("the send_join answer has no state list")
    user_id = join_event.get("state_key")
    before: list[Any] = []
    ours: list[Any] = []
    for pdu in state:
        mine = (
            isinstance(pdu, Mapping)
            and pdu.get("type") == "m.room.member"
            and pdu.get("state_key") == user_id
        )
        (ours if mine else before).append(pdu)
    auth_chain = answer.get("auth_chain", [])
    body = {
        "room_version": room_version,
        "state": [*before, dict(join_event)],
        # Our earlier membership stays among the events (members may ask for the state
        # before our join), no longer in the state.
        "auth_chain": [*auth_chain, *ours] if isinstance(auth_chain, list) else auth_chain,
        "latest_event": dict(join_event),
    }
    validated = validate_peek_response(
        body, room_id=room_id, supported_versions=[room_version], keys=keys
    )
    if validated.latest_event_id != join_event_id:
        raise InvalidPeekResponse("our join event changed on the way")
    return validated


def check_summary(answer: Any) -> None:
    """Check that the room a ``GET /_matrix/federation/v1/hierarchy/{roomId}`` answer
    describes (``{"room": {"world_readable", "encryption"?, ...}}``) may be joined to be
    peeked: it is ``world_readable`` and carries no ``encryption`` (MSC2753; protocol.md
    decision 6). The room version is left to ``make_join`` (its ``ver`` list).

    Raises:
        InvalidPeekResponse: the answer has no ``room`` object.
        RoomNotPeekable: (a subclass) the room is not world_readable, or is encrypted.
    """
    room = answer.get("room") if isinstance(answer, Mapping) else None
    if not isinstance(room, Mapping):
        raise InvalidPeekResponse("the hierarchy answer has no room object")
    if room.get("world_readable") is not True:
        raise RoomNotPeekable("the room is not world_readable (its summary says so)")
    if room.get("encryption") is not None:
        raise RoomNotPeekable("the room is encrypted (its summary says so)")


#: After a join that had to be undone (the room may not be peeked after all, or its answer
#: was unusable or never came), the room is not joined again for 10 min, doubling up to a
#: day (±20 %): every attempt shows room members a join and a leave.
JOIN_HOLD_MS = (600_000, 86_400_000)
#: At most this many rooms are held; beyond it the oldest entry goes first.
MAX_HELD_ROOMS = 10_000


@dataclass
class JoinHolds:
    """Rooms not to be joined again for a while, after a join that had to be undone (see
    :data:`JOIN_HOLD_MS`). Pure: times (ms since the epoch) and jitter draws (in [0, 1))
    are passed in."""

    #: room ID → (held until, ms; joins undone in a row; why the last one was undone; the
    #: HTTP status a device got for it).
    _rooms: dict[str, tuple[int, int, str, int]] = field(default_factory=dict)

    def undone(self, room_id: str, reason: str, status: int, now_ms: int, draw: float) -> int:
        """A join of ``room_id`` had to be undone (``reason``; the device got ``status``):
        hold the room; returns until when (ms)."""
        _, count, _, _ = self._rooms.pop(room_id, (0, 0, "", 0))
        count += 1
        until = now_ms + int(backoff_delay(count, *JOIN_HOLD_MS, draw))
        self._rooms[room_id] = (until, count, reason, status)
        while len(self._rooms) > MAX_HELD_ROOMS:
            del self._rooms[next(iter(self._rooms))]
        return until

    def held(self, room_id: str, now_ms: int) -> tuple[int, str] | None:
        """(status, why) ``room_id`` is not to be joined now (the last failure's status, its
        reason and for how long), or ``None``. A hold that ran out is kept (it still counts
        for the next one) but does not hold."""
        entry = self._rooms.get(room_id)
        if entry is None or entry[0] <= now_ms:
            return None
        minutes = -(-(entry[0] - now_ms) // 60_000)  # rounded up
        return entry[3], f"{entry[2]}; the observer does not join it again for {minutes} min"

    def joined(self, room_id: str) -> None:
        """A join of ``room_id`` worked: its hold count starts afresh."""
        self._rooms.pop(room_id, None)

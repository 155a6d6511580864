"""Pure event algorithms: redaction, content hash, reference hash, event and room IDs.

Every function takes the PDU as parsed JSON (a mapping) and, where the algorithm depends on
the room version, its :class:`~peekproxy.core.room_versions.RoomVersion`. Nothing here
does I/O or checks signatures (see :mod:`peekproxy.core.pdu`).

Byte-level facts (SSAPI §Calculating the content hash / reference hash; APPX §Signing
Details):

* content hash = sha256 of the canonical JSON of the full event minus ``unsigned``,
  ``signatures`` and ``hashes``;
* reference hash = sha256 of the canonical JSON of the *redacted* event minus
  ``signatures`` and ``unsigned`` (``hashes`` stays in);
* the event signature is over exactly those reference-hash bytes, so encode them once
  (:func:`reference_hash_input`) and use them for both.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from unpaddedbase64 import encode_base64

from peekproxy.core.canonical_json import encode_canonical
from peekproxy.core.room_versions import EventIdFormat, RedactionRules, RoomVersion, room_version

__all__ = [
    "best_effort_event_id",
    "compute_event_id",
    "content_hash",
    "content_hash_input",
    "event_id_from_reference_hash",
    "event_refs",
    "hash_inputs",
    "in_room",
    "redact",
    "reference_hash",
    "reference_hash_input",
    "room_id_for_create",
]

#: Top-level keys every room version's redaction keeps (``v1-redactions.md``, minus the
#: three that ``v11-redactions.md`` drops).
_TOP_LEVEL_KEPT = frozenset(
    {
        "event_id",
        "type",
        "room_id",
        "sender",
        "state_key",
        "content",
        "hashes",
        "signatures",
        "depth",
        "prev_events",
        "auth_events",
        "origin_server_ts",
    }
)
_TOP_LEVEL_LEGACY = frozenset({"origin", "membership", "prev_state"})
#: Keys left out of the content-hash input (SSAPI §Calculating the content hash).
_NOT_HASHED = frozenset({"unsigned", "signatures", "hashes"})


@dataclass(frozen=True, slots=True)
class _RedactionPlan:
    """A :class:`RedactionRules` turned into lookup tables."""

    top_level: frozenset[str]
    signed: frozenset[str]  # top_level minus "signatures": the reference-hash keys
    content: Mapping[str, tuple[str, ...]]
    keep_all_content: frozenset[str]
    member_third_party_invite_signed: bool


@functools.cache
def _plan(rules: RedactionRules) -> _RedactionPlan:
    member = ["membership"]
    if rules.keep_member_join_authorised_via_users_server:
        member.append("join_authorised_via_users_server")
    join_rules = ["join_rule"]
    if rules.keep_join_rules_allow:
        join_rules.append("allow")
    power_levels = [
        "ban",
        "events",
        "events_default",
        "kick",
        "redact",
        "state_default",
        "users",
        "users_default",
    ]
    if rules.keep_power_levels_invite:
        power_levels.append("invite")
    content: dict[str, tuple[str, ...]] = {
        "m.room.member": tuple(member),
        "m.room.create": ("creator",),
        "m.room.join_rules": tuple(join_rules),
        "m.room.power_levels": tuple(power_levels),
        "m.room.history_visibility": ("history_visibility",),
    }
    if rules.keep_aliases_aliases:
        content["m.room.aliases"] = ("aliases",)
    if rules.keep_redaction_redacts:
        content["m.room.redaction"] = ("redacts",)
    top_level = _TOP_LEVEL_KEPT
    if rules.keep_origin_membership_prev_state:
        top_level = top_level | _TOP_LEVEL_LEGACY
    return _RedactionPlan(
        top_level=top_level,
        signed=top_level - {"signatures"},
        content=content,
        keep_all_content=frozenset({"m.room.create"} if rules.keep_all_create_content else ()),
        member_third_party_invite_signed=rules.keep_member_third_party_invite_signed,
    )


def redact(pdu: Mapping[str, Any], rules: RoomVersion) -> dict[str, Any]:
    """Apply the room version's redaction algorithm (rooms ``vN-redactions.md``; table in
    federation.md §3.4).

    Args:
        pdu: the event in federation format; it is not modified. Malformed input does not
            raise: a non-object ``content`` or a non-string ``type`` gives ``content: {}``.
        rules: the room version.

    Returns:
        A new dict with only the kept top-level keys and always a ``content`` key (``{}``
        when nothing is kept), as Synapse's ``prune_event`` does; ``unsigned`` is dropped.
        The top-level dict and ``content`` are new; values below them (``signatures``,
        ``prev_events``, ``users`` …) are shared with ``pdu``, so copy before mutating those.
    """
    plan = _plan(rules.redaction)
    kept = plan.top_level
    redacted = {key: value for key, value in pdu.items() if key in kept}
    redacted["content"] = _redact_content(pdu.get("type"), pdu.get("content"), plan)
    return redacted


def _redact_content(event_type: object, content: object, plan: _RedactionPlan) -> dict[str, Any]:
    if not isinstance(content, Mapping) or not isinstance(event_type, str):
        return {}
    if event_type in plan.keep_all_content:
        return dict(content)
    keys = plan.content.get(event_type)
    if keys is None:
        return {}
    kept = {key: content[key] for key in keys if key in content}
    if plan.member_third_party_invite_signed and event_type == "m.room.member":
        invite = content.get("third_party_invite")
        if isinstance(invite, Mapping) and "signed" in invite:
            kept["third_party_invite"] = {"signed": invite["signed"]}
    return kept


def content_hash_input(pdu: Mapping[str, Any]) -> bytes:
    """The bytes the content hash is computed over: canonical JSON of ``pdu`` minus
    ``unsigned``, ``signatures`` and ``hashes`` (SSAPI §Calculating the content hash).

    Raises:
        ValueError, TypeError, RecursionError: ``pdu`` cannot be encoded (see
            :func:`~peekproxy.core.canonical_json.encode_canonical`).
    """
    return encode_canonical({k: v for k, v in pdu.items() if k not in _NOT_HASHED})


def content_hash(pdu: Mapping[str, Any]) -> bytes:
    """The 32-byte sha256 content hash of the full (unredacted) ``pdu``; compare it with
    the base64-decoded ``hashes.sha256``.

    Raises:
        ValueError, TypeError, RecursionError: as :func:`content_hash_input`.
    """
    return hashlib.sha256(content_hash_input(pdu)).digest()


def reference_hash_input(redacted: Mapping[str, Any]) -> bytes:
    """Canonical JSON of an already *redacted* event minus ``signatures`` and ``unsigned``.

    These bytes are both the reference-hash input (SSAPI §Calculating the reference hash)
    and what the event's signatures sign (APPX §Signing Details).

    Raises:
        ValueError, TypeError, RecursionError: as :func:`content_hash_input`.
    """
    return encode_canonical(
        {k: v for k, v in redacted.items() if k != "signatures" and k != "unsigned"}
    )


def hash_inputs(pdu: Mapping[str, Any], rules: RoomVersion) -> tuple[bytes, dict[str, Any], bytes]:
    """Everything verification hashes, each encoded once.

    Returns:
        ``(content_hash_input(pdu), redact(pdu, rules), reference_hash_input(redacted))``;
        the last is also the signed bytes.

    Raises:
        ValueError, TypeError, RecursionError: as :func:`content_hash_input`.
    """
    plan = _plan(rules.redaction)
    kept = plan.signed
    hashed = encode_canonical({k: v for k, v in pdu.items() if k not in _NOT_HASHED})
    signed = {k: v for k, v in pdu.items() if k in kept}
    signed["content"] = _redact_content(pdu.get("type"), pdu.get("content"), plan)
    signed_bytes = encode_canonical(signed)
    if "signatures" in pdu:
        signed["signatures"] = pdu["signatures"]
    return hashed, signed, signed_bytes


def reference_hash(pdu: Mapping[str, Any], rules: RoomVersion) -> bytes:
    """The 32-byte sha256 reference hash: of the redacted event without ``signatures`` and
    ``unsigned``.

    Raises:
        ValueError, TypeError, RecursionError: as :func:`content_hash_input`.
    """
    return hashlib.sha256(reference_hash_input(redact(pdu, rules))).digest()


def event_id_from_reference_hash(reference_hash: bytes, rules: RoomVersion) -> str:
    """``$`` + the reference hash in the room version's base64 alphabet (rooms/v3, v4).

    Raises:
        ValueError: the room version takes event IDs from the ``event_id`` field (v1, v2).
    """
    if rules.event_id_format is EventIdFormat.REFERENCE_HASH_URLSAFE:
        return "$" + encode_base64(reference_hash, urlsafe=True)
    if rules.event_id_format is EventIdFormat.REFERENCE_HASH_BASE64:
        return "$" + encode_base64(reference_hash)
    raise ValueError(f"event IDs in {rules} are not derived from the reference hash")


def compute_event_id(pdu: Mapping[str, Any], rules: RoomVersion) -> str:
    """The event's ID: v1/v2 the ``event_id`` field (taken verbatim); v3+ derived from the
    reference hash (rooms/v3 §Event IDs; v4+ URL-safe).

    Raises:
        ValueError: v1/v2 and the PDU has no string ``event_id``; or (also TypeError,
            RecursionError) the PDU cannot be encoded.
    """
    if rules.event_id_format is EventIdFormat.EVENT_ID_FIELD:
        event_id = pdu.get("event_id")
        if not isinstance(event_id, str):
            raise ValueError(f"PDU in {rules} has no string 'event_id'")
        return event_id
    return event_id_from_reference_hash(reference_hash(pdu, rules), rules)


def room_id_for_create(create_pdu: Mapping[str, Any], rules: RoomVersion) -> str:
    """The room ID that an ``m.room.create`` PDU founds.

    Room version 12 (rooms/v12, APPX §Room IDs): ``!`` + the create event's reference hash
    in URL-safe base64, i.e. its event ID with ``!`` for ``$``. Earlier versions: the create
    event's own ``room_id`` field.

    Raises:
        ValueError: not an ``m.room.create`` event; a v12 create event that has a
            ``room_id``; an older one without a string ``room_id``; or (also TypeError,
            RecursionError) the PDU cannot be encoded.
    """
    if create_pdu.get("type") != "m.room.create":
        raise ValueError("not an m.room.create event")
    if rules.format.room_id_is_create_event_hash:
        if "room_id" in create_pdu:
            raise ValueError(f"an m.room.create event in {rules} must not have a room_id")
        return "!" + encode_base64(reference_hash(create_pdu, rules), urlsafe=True)
    room_id = create_pdu.get("room_id")
    if not isinstance(room_id, str):
        raise ValueError("m.room.create event has no string room_id")
    return room_id


def event_refs(value: Any) -> list[str]:
    """The event IDs a PDU's ``prev_events`` or ``auth_events`` field names: plain IDs
    (room versions 3+) or ``[id, hashes]`` pairs (v1, v2); anything malformed is skipped."""
    if not isinstance(value, list):
        return []
    out = []
    for item in value:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, list) and item and isinstance(item[0], str):
            out.append(item[0])
    return out


def best_effort_event_id(pdu: Any) -> str | None:
    """The ID of a PDU of a room we do not know the version of: its ``event_id`` field
    (v1/v2), else the reference hash under the current default room version's rules."""
    if not isinstance(pdu, dict):
        return None
    if isinstance(pdu.get("event_id"), str):
        return str(pdu["event_id"])
    try:
        return compute_event_id(pdu, room_version("12"))
    except Exception:
        return None


def in_room(pdu: Mapping[str, Any], room_id: str, rules: RoomVersion) -> bool:
    """Whether a PDU belongs to ``room_id``. Room version 12's ``m.room.create`` has no
    ``room_id``: the room ID is its reference hash (rooms/v12, MSC4291)."""
    if pdu.get("type") == "m.room.create" and rules.format.room_id_is_create_event_hash:
        try:
            return room_id_for_create(pdu, rules) == room_id
        except (ValueError, TypeError, RecursionError):
            return False
    return pdu.get("room_id") == room_id

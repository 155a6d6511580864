"""Room versions 1-12 as data: one immutable :class:`RoomVersion` record per version.

Each version is built from the previous one with :func:`dataclasses.replace`, changing only
what the spec changed, so a new room version is one new record and no code elsewhere tests
version numbers. Switches are grouped by concern (format, signatures, redaction); each one
names the spec section that introduced it. "rooms/vN" means ``content/rooms/vN.md`` and its
fragments in the matrix-spec repository; "SSAPI" the server-server API.

What PDU verification (SSAPI §Checks performed on receipt of a PDU, steps 1-3) and the
authorization rules (steps 4-6, :mod:`peekproxy.core.auth_rules`) need is modelled; state
resolution is not.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

__all__ = [
    "KNOWN_ROOM_VERSIONS",
    "AuthRules",
    "EventIdFormat",
    "FormatRules",
    "RedactionRules",
    "RoomVersion",
    "SignatureRules",
    "UnknownRoomVersion",
    "room_version",
]


class UnknownRoomVersion(ValueError):
    """The room version identifier is not one this server implements."""


class EventIdFormat(enum.Enum):
    """Where an event's ID comes from."""

    #: rooms/v1 §Event IDs: ``$localpart:server``, carried in the PDU's ``event_id`` field.
    EVENT_ID_FIELD = "event_id field"
    #: rooms/v3 §Event IDs: ``$`` + the reference hash in standard unpadded base64
    #: (may contain ``+`` and ``/``); the PDU carries no ``event_id``.
    REFERENCE_HASH_BASE64 = "reference hash, standard base64"
    #: rooms/v4 §Event IDs (``v4-event-ids.md``): ``$`` + the reference hash in URL-safe
    #: unpadded base64 (``-`` and ``_``), 43 characters after the ``$``.
    REFERENCE_HASH_URLSAFE = "reference hash, URL-safe base64"


@dataclass(frozen=True, slots=True)
class FormatRules:
    """What a valid event looks like (SSAPI §Checks performed on receipt of a PDU, step 1)."""

    #: rooms/v6 §Canonical JSON (``v6-canonical-json.md``): the whole PDU must be strict
    #: canonical JSON (no floats, integers within ±(2^53-1)) or it is dropped. In v1-v5
    #: servers MUST NOT enforce this (``v1-canonical-json.md``).
    strict_canonical_json: bool = False
    #: CSAPI §Size limits say ``sender``/``room_id``/``event_id``/``state_key``/``type`` are
    #: at most 255 *bytes*. Synapse (``strict_event_byte_limits_room_versions``) enforces
    #: bytes only from v11 and counts code points before, so as not to split old DAGs.
    strict_event_byte_limits: bool = False
    #: rooms/v12 (MSC4291) and APPX §Room IDs: ``m.room.create`` has no ``room_id``; the
    #: room ID is ``!`` + the create event's reference hash (URL-safe base64), and every
    #: other event's ``room_id`` has that server-less form.
    room_id_is_create_event_hash: bool = False


@dataclass(frozen=True, slots=True)
class SignatureRules:
    """Whose signatures an event needs and which keys count (SSAPI §Validating hashes and
    signatures on received events, step 2 of the receipt checks)."""

    #: rooms/v1 §Signing: the server named in a ``$local:server`` event ID must also sign
    #: when it differs from the sender's server. Gone with v3, which has no such IDs.
    event_id_server_signs: bool = False
    #: rooms/v5 §Signing key validity period (``v5-signing-requirements.md``): a key counts
    #: only if its ``valid_until_ts`` is at or after the event's ``origin_server_ts``
    #: (v1-v4 MUST ignore ``valid_until_ts``).
    enforce_key_validity: bool = False
    #: rooms/v8 §Authorization rules (``v8-auth-rules.md``), restricted joins: a join whose
    #: content has ``join_authorised_via_users_server`` must be signed by that user's server.
    restricted_join_authoriser_signs: bool = False


@dataclass(frozen=True, slots=True)
class RedactionRules:
    """What the redaction algorithm keeps (rooms fragments ``v1-redactions.md``,
    ``v6-redactions.md``, ``v8.md``, ``v9-redactions.md``, ``v11-redactions.md``).

    The base (v1) algorithm keeps the top-level keys ``event_id type room_id sender
    state_key content hashes signatures depth prev_events auth_events origin_server_ts``
    plus the three in :attr:`keep_origin_membership_prev_state`, and in ``content`` only:
    member ``membership``; create ``creator``; join_rules ``join_rule``; power_levels
    ``ban events events_default kick redact state_default users users_default``;
    history_visibility ``history_visibility``; plus the switches below.
    """

    #: v1-v10 keep top-level ``origin``, ``membership`` and ``prev_state``;
    #: ``v11-redactions.md`` drops them.
    keep_origin_membership_prev_state: bool = True
    #: ``v1-redactions.md``: ``m.room.aliases`` keeps ``aliases``; ``v6-redactions.md``
    #: removes that special case.
    keep_aliases_aliases: bool = True
    #: rooms/v8 §Redactions: ``m.room.join_rules`` also keeps ``allow``.
    keep_join_rules_allow: bool = False
    #: ``v9-redactions.md``: ``m.room.member`` also keeps ``join_authorised_via_users_server``.
    keep_member_join_authorised_via_users_server: bool = False
    #: ``v11-redactions.md``: ``m.room.create`` keeps all of its content (not just ``creator``).
    keep_all_create_content: bool = False
    #: ``v11-redactions.md``: ``m.room.power_levels`` also keeps ``invite``.
    keep_power_levels_invite: bool = False
    #: ``v11-redactions.md``: ``m.room.redaction`` keeps ``content.redacts``.
    keep_redaction_redacts: bool = False
    #: ``v11-redactions.md``: ``m.room.member`` keeps ``third_party_invite.signed`` (only
    #: that sub-key of ``third_party_invite``).
    keep_member_third_party_invite_signed: bool = False


@dataclass(frozen=True, slots=True)
class AuthRules:
    """How the authorization rules differ across room versions (rooms/vN §Authorization
    rules; :mod:`peekproxy.core.auth_rules` applies them). The v1 defaults are the base rules."""

    #: rooms/v1-v5 §Authorization rules: ``m.room.aliases`` needs a ``state_key`` equal to
    #: the sender's domain and skips the membership and power checks; rooms/v6
    #: (``v6-auth-rules.md``) makes it an ordinary state event.
    special_case_aliases_auth: bool = True
    #: rooms/v6: the ``notifications`` key of ``m.room.power_levels`` is checked like
    #: ``events`` when power levels change.
    limit_notifications_power_levels: bool = False
    #: rooms/v7 (MSC2403): the ``knock`` membership and join rule.
    knock_join_rule: bool = False
    #: rooms/v8 (MSC3083): the ``restricted`` join rule with ``join_authorised_via_users_server``.
    restricted_join_rule: bool = False
    #: rooms/v10 (MSC3787): the ``knock_restricted`` join rule.
    knock_restricted_join_rule: bool = False
    #: rooms/v10 (MSC3667): power levels must be JSON integers (v1-v9 accept strings that are
    #: integers, read as Python's ``int()`` reads them, as Synapse does).
    enforce_int_power_levels: bool = False
    #: rooms/v11 (MSC2175): the room's creator is the create event's ``sender`` (v1-v10: its
    #: ``content.creator``, which must be present).
    implicit_room_creator: bool = False
    #: rooms/v12 (MSC4289): the creator and ``additional_creators`` have infinite power and
    #: must not be listed in ``m.room.power_levels`` ``users``.
    privileged_creators: bool = False
    #: rooms/v12 (MSC4291): the create event is implied by the room ID: events must not list
    #: it in ``auth_events``, and it is found from ``room_id`` instead.
    create_event_implied: bool = False
    #: rooms/v1-v2 §Authorization rules: a redaction by a sender below the ``redact`` level
    #: is allowed only for an event of the sender's own server (by event ID domain); v3+
    #: (no server in event IDs) always passes the auth rules and is checked when shown.
    redaction_checks_event_id_domain: bool = True


@dataclass(frozen=True, slots=True)
class RoomVersion:
    """The rules of one room version that PDU verification depends on."""

    #: The room version identifier as it appears in ``m.room.create`` (``"1"`` … ``"12"``).
    identifier: str
    event_id_format: EventIdFormat
    format: FormatRules
    signatures: SignatureRules
    redaction: RedactionRules
    auth: AuthRules = AuthRules()

    def __str__(self) -> str:
        return f"room version {self.identifier}"


V1 = RoomVersion(
    identifier="1",
    event_id_format=EventIdFormat.EVENT_ID_FIELD,
    format=FormatRules(),
    signatures=SignatureRules(event_id_server_signs=True),
    redaction=RedactionRules(),
)
#: rooms/v2: state resolution v2 only; nothing this module models changed.
V2 = replace(V1, identifier="2")
#: rooms/v3: event IDs are reference hashes, so no event-ID server to sign.
V3 = replace(
    V2,
    identifier="3",
    event_id_format=EventIdFormat.REFERENCE_HASH_BASE64,
    signatures=replace(V2.signatures, event_id_server_signs=False),
    auth=replace(V2.auth, redaction_checks_event_id_domain=False),
)
#: rooms/v4: URL-safe event IDs.
V4 = replace(V3, identifier="4", event_id_format=EventIdFormat.REFERENCE_HASH_URLSAFE)
#: rooms/v5: signing-key validity is enforced.
V5 = replace(V4, identifier="5", signatures=replace(V4.signatures, enforce_key_validity=True))
#: rooms/v6: strict canonical JSON; the ``m.room.aliases`` redaction special case is gone.
V6 = replace(
    V5,
    identifier="6",
    format=replace(V5.format, strict_canonical_json=True),
    redaction=replace(V5.redaction, keep_aliases_aliases=False),
    auth=replace(V5.auth, special_case_aliases_auth=False, limit_notifications_power_levels=True),
)
#: rooms/v7: knocking (an auth-rule change only).
V7 = replace(V6, identifier="7", auth=replace(V6.auth, knock_join_rule=True))
#: rooms/v8: restricted joins (authoriser signature; ``join_rules.allow`` survives redaction).
V8 = replace(
    V7,
    identifier="8",
    signatures=replace(V7.signatures, restricted_join_authoriser_signs=True),
    redaction=replace(V7.redaction, keep_join_rules_allow=True),
    auth=replace(V7.auth, restricted_join_rule=True),
)
#: rooms/v9: ``join_authorised_via_users_server`` survives redaction.
V9 = replace(
    V8,
    identifier="9",
    redaction=replace(V8.redaction, keep_member_join_authorised_via_users_server=True),
)
#: rooms/v10: integer-only power levels and knock_restricted (auth-rule changes only).
V10 = replace(
    V9,
    identifier="10",
    auth=replace(V9.auth, knock_restricted_join_rule=True, enforce_int_power_levels=True),
)
#: rooms/v11 (MSC2174, MSC2175, MSC2176, MSC3821, MSC3989): redaction overhaul; Synapse's
#: strict byte limits start here.
V11 = replace(
    V10,
    identifier="11",
    format=replace(V10.format, strict_event_byte_limits=True),
    redaction=replace(
        V10.redaction,
        keep_origin_membership_prev_state=False,
        keep_all_create_content=True,
        keep_power_levels_invite=True,
        keep_redaction_redacts=True,
        keep_member_third_party_invite_signed=True,
    ),
    auth=replace(V10.auth, implicit_room_creator=True),
)
#: rooms/v12 (MSC4291, MSC4289, MSC4297): room IDs are the create event's reference hash.
V12 = replace(
    V11,
    identifier="12",
    format=replace(V11.format, room_id_is_create_event_hash=True),
    auth=replace(V11.auth, privileged_creators=True, create_event_implied=True),
)

#: Every implemented room version, by identifier, oldest first.
KNOWN_ROOM_VERSIONS: Mapping[str, RoomVersion] = MappingProxyType(
    {v.identifier: v for v in (V1, V2, V3, V4, V5, V6, V7, V8, V9, V10, V11, V12)}
)


def room_version(identifier: str) -> RoomVersion:
    """The rules for room version ``identifier`` (``"1"`` … ``"12"``).

    Raises:
        UnknownRoomVersion: the identifier is not a known room version (including unstable
            ones such as ``org.matrix.msc…``).
    """
    try:
        return KNOWN_ROOM_VERSIONS[identifier]
    except (KeyError, TypeError):
        known = ", ".join(KNOWN_ROOM_VERSIONS)
        raise UnknownRoomVersion(f"unknown room version {identifier!r} (known: {known})") from None

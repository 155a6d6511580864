"""Checks on receipt of a PDU, steps 1-3 (SSAPI §Checks performed on receipt of a PDU).

Pure: no network, no disk, no clock. The keys arrive through a :class:`KeyLookup`, which
the I/O shell fills beforehand (:func:`required_signers` says which servers' keys it needs).

1. The PDU must be a valid event for its room version (required keys and their types,
   identifier grammar and byte limits, 65,536-byte size, strict canonical JSON in v6+);
   otherwise **reject** (the spec says "dropped").
2. The required servers must have signed the redacted event (SSAPI §Validating hashes and
   signatures on received events); otherwise **reject**.
3. The content hash must match; otherwise **redact**: keep the redacted copy instead.

Steps 4-7 (authorization rules, soft failure, policy servers) are not done here.
:func:`check_pdu` never raises on malformed input; it rejects with a reason.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from signedjson.types import VerifyKey as SignedJsonVerifyKey
from unpaddedbase64 import decode_base64, encode_base64

from peekproxy.core.canonical_json import (
    MAX_SAFE_INTEGER,
    check_canonical_numbers,
    encode_canonical,
)
from peekproxy.core.events import event_id_from_reference_hash, hash_inputs
from peekproxy.core.identifiers import EventId, InvalidIdentifier, RoomId, UserId
from peekproxy.core.room_versions import EventIdFormat, RoomVersion

__all__ = [
    "MAX_PDU_BYTES",
    "KeyLookup",
    "Outcome",
    "PduVerdict",
    "VerifyKeyInfo",
    "check_pdu",
    "check_pdus",
    "key_table",
    "required_signers",
    "signer_key_ids",
    "signer_key_validity",
]

#: CSAPI §Size limits: the whole event, signatures included, as canonical JSON.
MAX_PDU_BYTES = 65_536
#: CSAPI §Size limits: ``type`` and ``state_key`` (and the identifiers) at most 255.
MAX_FIELD_LENGTH = 255
#: The largest ``depth`` the spec allows (2^63 - 1).
MAX_DEPTH = 2**63 - 1

Outcome = Literal["accept", "redact", "reject"]

#: Top-level keys outside the content hash (SSAPI §Calculating the content hash).
_UNHASHED = ("hashes", "signatures", "unsigned")


@dataclass(frozen=True, slots=True)
class VerifyKeyInfo:
    """One server's public key as the keyring knows it.

    ``valid_until_ts`` (ms since the epoch) applies to a current key (``verify_keys``) and
    should already be capped at fetch time + 7 days (SSAPI §Publishing Keys). ``expired_ts``
    (ms) applies to a retired key (``old_verify_keys``). ``None`` means no bound.
    """

    verify_key: VerifyKey | SignedJsonVerifyKey
    valid_until_ts: int | None = None
    expired_ts: int | None = None

    @classmethod
    def from_base64(
        cls, key: str, *, valid_until_ts: int | None = None, expired_ts: int | None = None
    ) -> VerifyKeyInfo:
        """Build from the unpadded base64 public key of a key document.

        Raises:
            ValueError: not base64 of a 32-byte ed25519 key.
        """
        raw = decode_base64(key)
        if len(raw) != 32:
            raise ValueError(f"an ed25519 public key is 32 bytes, got {len(raw)}")
        return cls(VerifyKey(raw), valid_until_ts, expired_ts)


class KeyLookup(Protocol):
    """``keys(server_name, key_id)``: the key, or ``None`` when it is unknown.

    ``key_id`` is ``algorithm:version``, e.g. ``ed25519:a_Dq73``. It must not do I/O.
    """

    def __call__(self, server_name: str, key_id: str, /) -> VerifyKeyInfo | None: ...


def key_table(keys: Mapping[tuple[str, str], VerifyKeyInfo]) -> KeyLookup:
    """A :class:`KeyLookup` over a fixed ``{(server_name, key_id): VerifyKeyInfo}``."""
    table = dict(keys)

    def lookup(server_name: str, key_id: str, /) -> VerifyKeyInfo | None:
        return table.get((server_name, key_id))

    return lookup


@dataclass(frozen=True, slots=True)
class PduVerdict:
    """The result of :func:`check_pdu`.

    * ``event_id``: the event's ID (v1/v2 the ``event_id`` field, v3+ computed), or
      ``None`` when it cannot be known (e.g. the PDU cannot be encoded at all);
    * ``outcome``: ``accept``, ``redact`` (content hash mismatch: store the redacted copy)
      or ``reject`` (the spec's "drop");
    * ``reason``: a one-line, human-readable reason (``"ok"`` when accepted);
    * ``pdu``: what to store: the PDU itself for ``accept``, its redacted copy for
      ``redact``, ``None`` for ``reject``.
    """

    event_id: str | None
    outcome: Outcome
    reason: str
    pdu: dict[str, Any] | None

    @property
    def accepted(self) -> bool:
        """True when the outcome is ``accept``."""
        return self.outcome == "accept"


def _server_of(user_id: object) -> str | None:
    if not isinstance(user_id, str):
        return None
    _, sep, server = user_id.partition(":")
    return server if sep and server else None


def _is_invite_via_third_party(pdu: Mapping[str, Any]) -> bool:
    content = pdu.get("content")
    return (
        pdu.get("type") == "m.room.member"
        and isinstance(content, Mapping)
        and content.get("membership") == "invite"
        and "third_party_invite" in content
    )


def _authorising_user(pdu: Mapping[str, Any], rules: RoomVersion) -> object:
    """``content.join_authorised_via_users_server`` of a v8+ join, else ``None``."""
    if not rules.signatures.restricted_join_authoriser_signs:
        return None
    content = pdu.get("content")
    if (
        pdu.get("type") == "m.room.member"
        and isinstance(content, Mapping)
        and content.get("membership") == "join"
    ):
        return content.get("join_authorised_via_users_server")
    return None


def required_signers(pdu: Mapping[str, Any], rules: RoomVersion) -> set[str]:
    """The server names whose signatures ``pdu`` needs (SSAPI §Validating hashes and
    signatures on received events), so the caller can fetch their keys first.

    * the server of ``sender``, except for an invite made from a third-party invite
      (``m.room.member``, ``membership: invite``, ``content.third_party_invite``), which
      another server may send;
    * v1/v2: also the server of the ``$local:server`` event ID;
    * v8+: for a join with ``content.join_authorised_via_users_server``, that user's server.

    Never raises; parts that are malformed contribute nothing (:func:`check_pdu` rejects
    such PDUs anyway).
    """
    servers: set[str] = set()
    if not isinstance(pdu, Mapping):
        return servers
    if not _is_invite_via_third_party(pdu):
        sender_server = _server_of(pdu.get("sender"))
        if sender_server is not None:
            servers.add(sender_server)
    if rules.signatures.event_id_server_signs:
        event_server = _server_of(pdu.get("event_id"))
        if event_server is not None:
            servers.add(event_server)
    authoriser_server = _server_of(_authorising_user(pdu, rules))
    if authoriser_server is not None:
        servers.add(authoriser_server)
    return servers


def _reject(event_id: str | None, reason: str) -> PduVerdict:
    return PduVerdict(event_id, "reject", reason, None)


def check_pdu(pdu: Mapping[str, Any], rules: RoomVersion, keys: KeyLookup) -> PduVerdict:
    """Run receipt checks 1-3 on one PDU (federation format, as parsed from JSON).

    Args:
        pdu: the PDU; not modified. Anything, even a non-mapping, is accepted as input.
        rules: the room's version.
        keys: looks up the keys of :func:`required_signers`; unknown keys are skipped.

    Returns:
        The verdict; its ``pdu`` (the one to store) never has ``unsigned``, which is ignored
        by every check. For v5+ a key counts only if ``valid_until_ts`` ≥ the event's
        ``origin_server_ts``; a retired key only if ``expired_ts`` > ``origin_server_ts``.
        Each required server needs at least one signature by a key that counts, and every
        signature by a key that counts must verify.
    """
    if type(pdu) is dict:
        event = pdu
    elif isinstance(pdu, Mapping):
        event = dict(pdu)
    else:
        return _reject(None, "PDU is not a JSON object")
    if "unsigned" in event:
        # ``unsigned`` is neither hashed nor signed: any relaying server can change it, so it
        # must not get a genuine event dropped (Synapse strips it before its checks too).
        event = {k: v for k, v in event.items() if k != "unsigned"}
    try:
        return _check(event, rules, keys)
    except RecursionError:
        return _reject(_field_event_id(event, rules), "PDU is nested too deeply")


def check_pdus(
    pdus: Iterable[Mapping[str, Any]], rules: RoomVersion, keys: KeyLookup
) -> list[PduVerdict]:
    """:func:`check_pdu` for each PDU, in order."""
    return [check_pdu(pdu, rules, keys) for pdu in pdus]


def _field_event_id(pdu: Mapping[str, Any], rules: RoomVersion) -> str | None:
    if rules.event_id_format is EventIdFormat.EVENT_ID_FIELD:
        event_id = pdu.get("event_id")
        return event_id if isinstance(event_id, str) else None
    return None


def _check(pdu: dict[str, Any], rules: RoomVersion, keys: KeyLookup) -> PduVerdict:
    # Encode first: the event ID (v3+) comes from the reference hash, and a PDU that cannot
    # be encoded as canonical JSON (NaN, lone surrogates, non-JSON values) is invalid anyway.
    event_id = _field_event_id(pdu, rules)
    try:
        hashed_bytes, redacted, signed_bytes = hash_inputs(pdu, rules)
        # Step 1: a valid event for the room version.
        problem = _format_problem(pdu, rules, len(hashed_bytes))
    except (ValueError, TypeError) as e:
        return _reject(event_id, f"not valid JSON for hashing: {_describe(e)}")
    if rules.event_id_format is not EventIdFormat.EVENT_ID_FIELD:
        event_id = event_id_from_reference_hash(hashlib.sha256(signed_bytes).digest(), rules)
    if problem is not None:
        return _reject(event_id, problem)

    # Step 2: signatures over the redacted event.
    problem = _signature_problem(pdu, signed_bytes, rules, keys)
    if problem is not None:
        return _reject(event_id, problem)

    # Step 3: the content hash.
    digest = hashlib.sha256(hashed_bytes).digest()
    claimed: str = pdu["hashes"]["sha256"]
    if claimed != encode_base64(digest) and _decode_hash(claimed) != digest:
        return PduVerdict(event_id, "redact", "content hash mismatch", redacted)
    return PduVerdict(event_id, "accept", "ok", pdu)


def _describe(error: Exception) -> str:
    if isinstance(error, UnicodeEncodeError):
        return "string is not valid Unicode (lone surrogate)"
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200]


def _decode_hash(value: str) -> bytes | None:
    """Lenient decoding (padding, URL-safe alphabet), as Synapse compares hashes."""
    try:
        return decode_base64(value)
    except ValueError:
        return None


# --- step 1: format ----------------------------------------------------------------------

#: Top-level keys every PDU has, with their JSON type (SSAPI §PDUs; rooms/vN §Event format).
#: ``room_id`` and (v1/v2) ``event_id`` are checked separately; ``origin`` is deprecated
#: and optional.
_REQUIRED_KEYS: tuple[tuple[str, type, str], ...] = (
    ("type", str, "a string"),
    ("content", dict, "an object"),
    ("sender", str, "a string"),
    ("origin_server_ts", int, "an integer"),
    ("depth", int, "an integer"),
    ("hashes", dict, "an object"),
    ("signatures", dict, "an object"),
    ("prev_events", list, "a list"),
    ("auth_events", list, "a list"),
)
#: Top-level non-string values that step 1 checks fully (in-range integers; an object of
#: objects of strings), so the strict canonical-JSON walk can skip them; with reference-hash
#: event IDs, ``prev_events``/``auth_events`` are checked to be lists of strings too.
_CHECKED = frozenset({"origin_server_ts", "depth", "signatures"})
_CHECKED_REFS = _CHECKED | {"prev_events", "auth_events"}
_FIELD = EventIdFormat.EVENT_ID_FIELD
#: Strings this short cannot exceed 255 bytes of UTF-8.
_SHORT = MAX_FIELD_LENGTH // 4


@functools.lru_cache(maxsize=4096)
def _parse_user_id(value: str) -> UserId | str:
    """``UserId.parse(value)`` or the error message; memoised, as senders recur."""
    try:
        return UserId.parse(value)
    except InvalidIdentifier as e:
        return str(e)


@functools.lru_cache(maxsize=1024)
def _parse_room_id(value: str) -> RoomId | str:
    """``RoomId.parse(value)`` or the error message; memoised, as rooms recur."""
    try:
        return RoomId.parse(value)
    except InvalidIdentifier as e:
        return str(e)


def _format_problem(pdu: dict[str, Any], rules: RoomVersion, hashed_size: int) -> str | None:
    """Why ``pdu`` is not a valid event for ``rules``, or ``None``.

    ``hashed_size`` is the length of the content-hash input (the PDU minus ``hashes``,
    ``signatures`` and ``unsigned``), from which the whole PDU's size is bounded.

    Raises:
        ValueError: a string in ``hashes``/``signatures``/``unsigned`` cannot be encoded.
    """
    for key, kind, what in _REQUIRED_KEYS:
        if type(pdu.get(key)) is not kind:
            return f"missing or invalid {key!r} (must be {what})"
    max_int = MAX_SAFE_INTEGER if rules.format.strict_canonical_json else MAX_DEPTH
    for key in ("origin_server_ts", "depth"):
        if not 0 <= pdu[key] <= max_int:
            return f"{key!r} is out of range"
    parsed = _parse_user_id(pdu["sender"])
    if isinstance(parsed, str):
        return f"invalid 'sender': {parsed}"
    problem = _room_id_problem(pdu, rules)
    if problem is not None:
        return problem
    if rules.event_id_format is EventIdFormat.EVENT_ID_FIELD:
        problem = _event_id_field_problem(pdu.get("event_id"), rules)
        if problem is not None:
            return problem
    state_key = pdu.get("state_key")
    if state_key is not None or "state_key" in pdu:
        if type(state_key) is not str:
            return "invalid 'state_key' (must be a string)"
        if len(state_key) > _SHORT:
            problem = _length_problem("state_key", state_key, rules)
            if problem is not None:
                return problem
    if len(pdu["type"]) > _SHORT:
        problem = _length_problem("type", pdu["type"], rules)
        if problem is not None:
            return problem
    hashes: dict[str, Any] = pdu["hashes"]
    sha256 = hashes.get("sha256")
    if type(sha256) is not str:
        return "invalid 'hashes' (must hold a sha256 string)"
    signatures_size = _signatures_size_bound(pdu["signatures"])
    if signatures_size is None:
        return "invalid 'signatures' (must map server -> key ID -> base64 string)"
    for key in ("prev_events", "auth_events"):
        problem = _references_problem(key, pdu[key], rules)
        if problem is not None:
            return problem

    # CSAPI §Size limits: 65,536 bytes as canonical JSON, signatures included. Bound the
    # parts outside the content hash first; encode them only if the bound is too big.
    only_sha256 = len(hashes) == 1
    hashes_size = _str_bound(sha256) + 12 if only_sha256 else _size_bound(hashes)
    size = hashed_size + signatures_size + 14 + hashes_size + 10
    if "unsigned" in pdu:
        size += _size_bound(pdu["unsigned"]) + 12
    if size > MAX_PDU_BYTES:
        unhashed = encode_canonical({k: pdu[k] for k in _UNHASHED if k in pdu})
        size = hashed_size + len(unhashed) - 1  # two objects merged: one "{}" less, one ","
        if size > MAX_PDU_BYTES:
            return f"PDU is {size} bytes as canonical JSON (limit {MAX_PDU_BYTES})"

    if rules.format.strict_canonical_json:
        # rooms/v6 §Canonical JSON. Every string was checked by encoding (or bounding) it
        # above, and the values checked above need no walk, so only numbers elsewhere are
        # left.
        checked = _CHECKED_REFS if rules.event_id_format is not _FIELD else _CHECKED
        for key, value in pdu.items():
            if type(value) is not str and key not in checked:
                if key == "hashes" and only_sha256:
                    continue
                problem = check_canonical_numbers(value)
                if problem is not None:
                    return problem
    return None


def _length_problem(key: str, value: str, rules: RoomVersion) -> str | None:
    """CSAPI §Size limits: at most 255 bytes (v11+), or 255 code points before."""
    if rules.format.strict_event_byte_limits:
        if len(value.encode("utf-8")) > MAX_FIELD_LENGTH:
            return f"{key!r} is longer than {MAX_FIELD_LENGTH} bytes"
    elif len(value) > MAX_FIELD_LENGTH:
        return f"{key!r} is longer than {MAX_FIELD_LENGTH} characters"
    return None


def _event_id_field_problem(value: object, rules: RoomVersion) -> str | None:
    if not isinstance(value, str):
        return f"missing or invalid 'event_id' (required in {rules})"
    try:
        event_id = EventId.parse(value)
    except InvalidIdentifier as e:
        return f"invalid 'event_id': {e}"
    if event_id.server_name is None:
        return f"'event_id' must be $localpart:server in {rules}"
    return None


def _room_id_problem(pdu: Mapping[str, Any], rules: RoomVersion) -> str | None:
    hash_form = rules.format.room_id_is_create_event_hash
    if hash_form and pdu["type"] == "m.room.create":
        if "room_id" in pdu:
            return f"an m.room.create event must not have a 'room_id' in {rules}"
        return None
    raw = pdu.get("room_id")
    if not isinstance(raw, str):
        return "missing or invalid 'room_id' (must be a string)"
    room_id = _parse_room_id(raw)
    if isinstance(room_id, str):
        return f"invalid 'room_id': {room_id}"
    if room_id.is_hash_form != hash_form:
        expected = "'!' + a reference hash" if hash_form else "!opaque:server"
        return f"'room_id' must be {expected} in {rules}"
    return None


def _references_problem(key: str, refs: list[Any], rules: RoomVersion) -> str | None:
    if rules.event_id_format is EventIdFormat.EVENT_ID_FIELD:
        # rooms/v1 §Event format: [[event_id, {"sha256": ...}], ...]; Synapse writes {}
        # for the hashes of some references, which must be accepted.
        for ref in refs:
            if not (
                type(ref) is list and len(ref) == 2 and type(ref[0]) is str and type(ref[1]) is dict
            ):
                return f"invalid {key!r} (must be [event_id, hashes] pairs in {rules})"
    else:
        for ref in refs:
            if type(ref) is not str or not ref.startswith("$"):
                return f"invalid {key!r} (must be a list of event IDs in {rules})"
    return None


def _str_bound(text: str) -> int:
    """At most 6 bytes per code point (``\\u00XX`` escapes; UTF-8 needs 4 at most) plus
    the quotes. Raises ``UnicodeEncodeError`` for a lone surrogate, as encoding would."""
    if not text.isascii():
        text.encode("utf-8")
    return 6 * len(text) + 2


def _signatures_size_bound(signatures: dict[str, Any]) -> int | None:
    """A bound on the encoded size of ``signatures``, or ``None`` if it is not an object of
    objects of strings. Raises ``UnicodeEncodeError`` for a lone surrogate."""
    total = 2
    for server, by_key in signatures.items():
        if type(by_key) is not dict:
            return None
        total += _str_bound(server) + 4  # ':' ',' '{' '}'
        for key_id, signature in by_key.items():
            if type(signature) is not str:
                return None
            if not (key_id.isascii() and signature.isascii()):
                key_id.encode("utf-8")
                signature.encode("utf-8")
            total += 6 * (len(key_id) + len(signature)) + 6
    return total


def _size_bound(value: object) -> int:
    """A bound on the encoded size of ``value`` (objects and strings bounded, the rest
    encoded)."""
    if type(value) is dict:
        total = 2
        for key, item in value.items():
            total += _size_bound(key) + _size_bound(item) + 2
        return total
    if type(value) is str:
        return _str_bound(value)
    return len(encode_canonical(value))


# --- step 2: signatures -----------------------------------------------------------------


def _signature_problem(
    pdu: Mapping[str, Any], signed_bytes: bytes, rules: RoomVersion, keys: KeyLookup
) -> str | None:
    """Why the signatures fail, or ``None`` when every required server signed."""
    if pdu["type"] == "m.room.member":
        authoriser = _authorising_user(pdu, rules)
        if authoriser is not None:
            parsed = _parse_user_id(authoriser) if isinstance(authoriser, str) else "not a string"
            if isinstance(parsed, str):
                return f"invalid 'join_authorised_via_users_server': {parsed}"
    signatures: dict[str, Any] = pdu["signatures"]
    origin_server_ts: int = pdu["origin_server_ts"]
    enforce_validity = rules.signatures.enforce_key_validity
    for server in sorted(required_signers(pdu, rules)):
        by_key = signatures.get(server)
        if not by_key:
            return f"not signed by {server}"
        skipped: list[str] = []
        verified = False
        for key_id, signature in by_key.items():
            if not key_id.startswith("ed25519:"):
                skipped.append(f"{key_id}: unsupported algorithm")
                continue
            info = keys(server, key_id)
            if info is None:
                skipped.append(f"{key_id}: unknown key")
                continue
            if info.expired_ts is not None and info.expired_ts <= origin_server_ts:
                skipped.append(f"{key_id}: key expired before origin_server_ts")
                continue
            if (
                enforce_validity
                and info.valid_until_ts is not None
                and info.valid_until_ts < origin_server_ts
            ):
                skipped.append(f"{key_id}: key not valid at origin_server_ts")
                continue
            try:
                info.verify_key.verify(signed_bytes, decode_base64(signature))
            except (BadSignatureError, ValueError):
                return f"no valid signature from {server} ({key_id}: bad signature)"
            verified = True
        if not verified:
            return f"no valid signature from {server} ({'; '.join(skipped)})"
    return None


def signer_key_ids(pdus: Iterable[Any], rules: RoomVersion) -> dict[str, list[str]]:
    """The ed25519 key IDs each required signer of ``pdus`` signed with: what to fetch
    before :func:`check_pdu` (non-objects are skipped)."""
    wanted: dict[str, set[str]] = {}
    for pdu in pdus:
        if not isinstance(pdu, dict):
            continue
        signatures = pdu.get("signatures")
        for server in required_signers(pdu, rules):
            ids = signatures.get(server) if isinstance(signatures, dict) else None
            wanted.setdefault(server, set()).update(
                k
                for k in (ids if isinstance(ids, dict) else {})
                if isinstance(k, str) and k.startswith("ed25519:")
            )
    return {server: sorted(ids) for server, ids in wanted.items()}


def signer_key_validity(pdus: Iterable[Any], rules: RoomVersion) -> dict[str, int]:
    """How long each required signer's keys must be valid to check ``pdus``: server name →
    the newest ``origin_server_ts`` (ms since the epoch) among the PDUs it must sign.

    Only for room versions that enforce key validity (v5 and later: a key counts only if
    its ``valid_until_ts`` is at or after the event's ``origin_server_ts``, rooms fragment
    ``v5-signing-requirements``); ``{}`` for v1-v4, which ignore ``valid_until_ts``. It is
    the ``minimum_valid_until_ts`` to fetch those keys with (SSAPI §Retrieving server keys).
    PDUs that are not objects or lack an integer ``origin_server_ts`` add nothing.
    """
    if not rules.signatures.enforce_key_validity:
        return {}
    needed: dict[str, int] = {}
    for pdu in pdus:
        if not isinstance(pdu, dict):
            continue
        ts = pdu.get("origin_server_ts")
        if type(ts) is not int:
            continue
        for server in required_signers(pdu, rules):
            needed[server] = max(needed.get(server, 0), ts)
    return needed

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
from unpaddedbase64 import decode_base64

from peekproxy.federation.canonical_json import check_canonical_numbers, encode_canonical
from peekproxy.federation.events import event_id_from_reference_hash, hash_inputs
from peekproxy.federation.room_versions import EventIdFormat, RoomVersion
from peekproxy.identifiers import EventId, InvalidIdentifier, RoomId, UserId

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
        The verdict. For v5+ a key counts only if ``valid_until_ts`` ≥ the event's
        ``origin_server_ts``; a retired key only if ``expired_ts`` > ``origin_server_ts``.
        Each required server needs at least one signature by a key that counts, and every
        signature by a key that counts must verify.
    """
    if not isinstance(pdu, Mapping):
        return _reject(None, "PDU is not a JSON object")
    event = pdu if type(pdu) is dict else dict(pdu)
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
        unhashed_size = _unhashed_size_bound(pdu)
    except (ValueError, TypeError) as e:
        return _reject(event_id, f"not valid JSON for hashing: {_describe(e)}")
    if rules.event_id_format is not EventIdFormat.EVENT_ID_FIELD:
        event_id = event_id_from_reference_hash(hashlib.sha256(signed_bytes).digest(), rules)

    # Step 1: a valid event for the room version.
    problem = _format_problem(pdu, rules)
    if problem is None:
        size = len(hashed_bytes) + unhashed_size
        if size > MAX_PDU_BYTES:
            # Only a bound so far: now measure exactly (the two encodings merged lose one
            # brace pair and gain one comma).
            unhashed = encode_canonical({k: pdu[k] for k in _UNHASHED if k in pdu})
            size = len(hashed_bytes) + len(unhashed) - 1
        if size > MAX_PDU_BYTES:
            problem = f"PDU is {size} bytes as canonical JSON (limit {MAX_PDU_BYTES})"
    if problem is None and rules.format.strict_canonical_json:
        # Every string was checked by encoding it above; only numbers are left.
        problem = check_canonical_numbers(pdu)
    if problem is not None:
        return _reject(event_id, problem)

    # Step 2: signatures over the redacted event.
    problem = _signature_problem(pdu, signed_bytes, rules, keys)
    if problem is not None:
        return _reject(event_id, problem)

    # Step 3: the content hash.
    expected = _decode_hash(pdu["hashes"]["sha256"])
    if expected != hashlib.sha256(hashed_bytes).digest():
        return PduVerdict(event_id, "redact", "content hash mismatch", redacted)
    return PduVerdict(event_id, "accept", "ok", pdu)


def _unhashed_size_bound(pdu: Mapping[str, Any]) -> int:
    """An upper bound on what ``hashes``, ``signatures`` and ``unsigned`` add to the PDU's
    canonical JSON, without encoding them in the usual case (objects of strings).

    A string of n code points encodes to at most 6n + 2 bytes (``\\u00XX`` escapes or
    4-byte UTF-8, plus quotes); each object member adds ``:`` and ``,``, each object ``{}``.
    Other values are encoded. Raises ``ValueError`` for an unencodable string (as encoding
    would), so every string of the PDU ends up checked.
    """
    total = 0
    for key in _UNHASHED:
        value = pdu.get(key)
        if value is not None:
            total += len(key) + 4 + _size_bound(value)
    return total


def _size_bound(value: object) -> int:
    if type(value) is dict:
        total = 2
        for key, item in value.items():
            total += _size_bound(key) + _size_bound(item) + 2
        return total
    if type(value) is str:
        if not value.isascii():
            value.encode("utf-8")  # raises UnicodeEncodeError on a lone surrogate
        return 6 * len(value) + 2
    return len(encode_canonical(value))


def _describe(error: Exception) -> str:
    if isinstance(error, UnicodeEncodeError):
        return "string is not valid Unicode (lone surrogate)"
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200]


def _decode_hash(value: str) -> bytes | None:
    try:
        return decode_base64(value)
    except ValueError:
        return None


# --- step 1: format ----------------------------------------------------------------------


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


def _format_problem(pdu: Mapping[str, Any], rules: RoomVersion) -> str | None:
    """Why ``pdu`` is not a valid event for ``rules``, or ``None``."""
    event_type = pdu.get("type")
    if not isinstance(event_type, str) or not event_type:
        return "missing or invalid 'type'"
    if not isinstance(pdu.get("content"), dict):
        return "missing or invalid 'content' (must be an object)"
    for key in ("origin_server_ts", "depth"):
        value = pdu.get(key)
        if type(value) is not int or not 0 <= value <= MAX_DEPTH:
            return f"missing or invalid {key!r} (must be a non-negative integer)"
    sender = pdu.get("sender")
    if not isinstance(sender, str):
        return "missing or invalid 'sender' (must be a string)"
    parsed = _parse_user_id(sender)
    if isinstance(parsed, str):
        return f"invalid 'sender': {parsed}"
    problem = _room_id_problem(pdu, rules)
    if problem is not None:
        return problem
    if rules.event_id_format is EventIdFormat.EVENT_ID_FIELD:
        try:
            event_id = EventId.parse(pdu.get("event_id"))  # type: ignore[arg-type]
        except InvalidIdentifier as e:
            return f"missing or invalid 'event_id': {e}"
        if event_id.server_name is None:
            return f"'event_id' must be $localpart:server in {rules}"
    if "state_key" in pdu and not isinstance(pdu["state_key"], str):
        return "invalid 'state_key' (must be a string)"
    for key in ("type", "state_key"):
        value = pdu.get(key)
        if value is not None:
            length = len(value.encode()) if rules.format.strict_event_byte_limits else len(value)
            if length > MAX_FIELD_LENGTH:
                unit = "bytes" if rules.format.strict_event_byte_limits else "characters"
                return f"{key!r} is longer than {MAX_FIELD_LENGTH} {unit}"
    problem = _hashes_problem(pdu.get("hashes"))
    if problem is None:
        problem = _signatures_shape_problem(pdu.get("signatures"))
    if problem is None:
        for key in ("prev_events", "auth_events"):
            problem = _references_problem(key, pdu.get(key), rules)
            if problem is not None:
                break
    return problem


def _room_id_problem(pdu: Mapping[str, Any], rules: RoomVersion) -> str | None:
    hash_form = rules.format.room_id_is_create_event_hash
    if hash_form and pdu.get("type") == "m.room.create":
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


def _hashes_problem(hashes: object) -> str | None:
    if not isinstance(hashes, dict) or not isinstance(hashes.get("sha256"), str):
        return "missing or invalid 'hashes' (must hold a sha256 string)"
    return None


def _signatures_shape_problem(signatures: object) -> str | None:
    if not isinstance(signatures, dict):
        return "missing or invalid 'signatures' (must be an object)"
    for by_key in signatures.values():
        if not isinstance(by_key, dict) or not all(isinstance(sig, str) for sig in by_key.values()):
            return "invalid 'signatures' (must map server -> key ID -> base64 string)"
    return None


def _references_problem(key: str, refs: object, rules: RoomVersion) -> str | None:
    if not isinstance(refs, list):
        return f"missing or invalid {key!r} (must be a list)"
    if rules.event_id_format is EventIdFormat.EVENT_ID_FIELD:
        # rooms/v1 §Event format: [[event_id, {"sha256": ...}], ...]; Synapse writes {}
        # for the hashes of some references, which must be accepted.
        for ref in refs:
            if not (
                isinstance(ref, list)
                and len(ref) == 2
                and isinstance(ref[0], str)
                and isinstance(ref[1], dict)
            ):
                return f"invalid {key!r} (must be [event_id, hashes] pairs in {rules})"
    else:
        for ref in refs:
            if not isinstance(ref, str) or not ref.startswith("$"):
                return f"invalid {key!r} (must be a list of event IDs in {rules})"
    return None


# --- step 2: signatures -----------------------------------------------------------------


def _signature_problem(
    pdu: Mapping[str, Any], signed_bytes: bytes, rules: RoomVersion, keys: KeyLookup
) -> str | None:
    """Why the signatures fail, or ``None`` when every required server signed."""
    authoriser = _authorising_user(pdu, rules)
    if authoriser is not None:
        try:
            UserId.parse(authoriser)  # type: ignore[arg-type]
        except InvalidIdentifier as e:
            return f"invalid 'join_authorised_via_users_server': {e}"
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

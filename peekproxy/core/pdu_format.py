"""Check 1 on receipt of a PDU: a valid event for its room version (SSAPI §Checks performed
on receipt of a PDU, step 1; rooms/vN §Event format; CSAPI §Size limits).

Pure: no I/O. :func:`format_problem` says why a PDU (federation format, as parsed from JSON) is
not a valid event for its room version: required keys and their JSON types, identifier grammar
and byte limits, the 65,536-byte size (:data:`MAX_PDU_BYTES`), strict canonical JSON in v6+.
:func:`peekproxy.core.pdu.check_pdu` rejects such a PDU (the spec says "dropped").
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from peekproxy.core.canonical_json import (
    MAX_SAFE_INTEGER,
    check_canonical_numbers,
    encode_canonical,
)
from peekproxy.core.identifiers import EventId, InvalidIdentifier, RoomId, UserId
from peekproxy.core.nul import pdu_nul_problem
from peekproxy.core.room_versions import EventIdFormat, RoomVersion

__all__ = [
    "MAX_DEPTH",
    "MAX_FIELD_LENGTH",
    "MAX_PDU_BYTES",
    "format_problem",
    "user_id_or_error",
]

#: CSAPI §Size limits: the whole event, signatures included, as canonical JSON.
MAX_PDU_BYTES = 65_536
#: CSAPI §Size limits: ``type`` and ``state_key`` (and the identifiers) at most 255.
MAX_FIELD_LENGTH = 255
#: The largest ``depth`` the spec allows (2^63 - 1).
MAX_DEPTH = 2**63 - 1

#: Top-level keys outside the content hash (SSAPI §Calculating the content hash).
_UNHASHED = ("hashes", "signatures", "unsigned")

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
def user_id_or_error(value: str) -> UserId | str:
    """``UserId.parse(value)``, or the error message (a ``str``) when ``value`` is not a
    user ID; memoised, as senders recur. Never raises."""
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


def format_problem(pdu: dict[str, Any], rules: RoomVersion, hashed_size: int) -> str | None:
    """Why ``pdu`` is not a valid event for ``rules`` (a one-line reason), or ``None``.

    ``hashed_size`` is the length of the content-hash input (the PDU minus ``hashes``,
    ``signatures`` and ``unsigned``), from which the whole PDU's size is bounded.

    Raises:
        ValueError: a string in ``hashes``/``signatures``/``unsigned`` cannot be encoded.
    """
    for key, kind, what in _REQUIRED_KEYS:
        if type(pdu.get(key)) is not kind:
            return f"missing or invalid {key!r} (must be {what})"
    problem = pdu_nul_problem(pdu)  # PostgreSQL's TEXT cannot hold it: refused on both
    if problem is not None:
        return problem
    max_int = MAX_SAFE_INTEGER if rules.format.strict_canonical_json else MAX_DEPTH
    for key in ("origin_server_ts", "depth"):
        if not 0 <= pdu[key] <= max_int:
            return f"{key!r} is out of range"
    parsed = user_id_or_error(pdu["sender"])
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

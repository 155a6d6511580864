"""Checks on receipt of a PDU, steps 1-3 (SSAPI §Checks performed on receipt of a PDU).

Pure: no network, no disk, no clock. The keys arrive through a
:class:`~peekproxy.core.pdu_signatures.KeyLookup`, which the I/O shell fills beforehand
(:func:`~peekproxy.core.pdu_signatures.required_signers` says which servers' keys it needs).

1. The PDU must be a valid event for its room version (required keys and their types,
   identifier grammar and byte limits, 65,536-byte size, strict canonical JSON in v6+);
   otherwise **reject** (the spec says "dropped"): :mod:`peekproxy.core.pdu_format`.
2. The required servers must have signed the redacted event (SSAPI §Validating hashes and
   signatures on received events); otherwise **reject**: :mod:`peekproxy.core.pdu_signatures`.
3. The content hash must match; otherwise **redact**: keep the redacted copy instead.

Steps 4-7 (authorization rules, soft failure, policy servers) are not done here.
:func:`check_pdu` never raises on malformed input; it rejects with a reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from unpaddedbase64 import decode_base64, encode_base64

from peekproxy.core.events import event_id_from_reference_hash, hash_inputs
from peekproxy.core.pdu_format import format_problem
from peekproxy.core.pdu_signatures import KeyLookup, signature_problem
from peekproxy.core.room_versions import EventIdFormat, RoomVersion

__all__ = ["Outcome", "PduVerdict", "check_pdu", "check_pdus"]

Outcome = Literal["accept", "redact", "reject"]


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
        problem = format_problem(pdu, rules, len(hashed_bytes))
    except (ValueError, TypeError) as e:
        return _reject(event_id, f"not valid JSON for hashing: {_describe(e)}")
    if rules.event_id_format is not EventIdFormat.EVENT_ID_FIELD:
        event_id = event_id_from_reference_hash(hashlib.sha256(signed_bytes).digest(), rules)
    if problem is not None:
        return _reject(event_id, problem)

    # Step 2: signatures over the redacted event.
    problem = signature_problem(pdu, signed_bytes, rules, keys)
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

"""Check 2 on receipt of a PDU: the required servers signed the redacted event (SSAPI
§Validating hashes and signatures on received events), and which keys that takes.

Pure: no I/O. The keys arrive through a :class:`KeyLookup` (:func:`key_table` builds one
from a mapping), which the I/O shell fills beforehand: :func:`required_signers` says which
servers must sign a PDU, :func:`signer_key_ids` which of their keys to fetch and
:func:`signer_key_validity` until when they must be valid (v5+). :func:`signature_problem`
is the check itself, run by :func:`peekproxy.core.pdu.check_pdu`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from signedjson.types import VerifyKey as SignedJsonVerifyKey
from unpaddedbase64 import decode_base64

from peekproxy.core.pdu_format import user_id_or_error
from peekproxy.core.room_versions import RoomVersion

__all__ = [
    "KeyLookup",
    "VerifyKeyInfo",
    "key_table",
    "required_signers",
    "signature_problem",
    "signer_key_ids",
    "signer_key_validity",
]


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


def signature_problem(
    pdu: Mapping[str, Any], signed_bytes: bytes, rules: RoomVersion, keys: KeyLookup
) -> str | None:
    """Why the signatures fail (a one-line reason), or ``None`` when every required server
    signed.

    ``signed_bytes`` is the canonical JSON of the redacted PDU without ``signatures`` and
    ``unsigned`` (what was signed). Which keys count, and how many signatures each server
    needs, is as :func:`peekproxy.core.pdu.check_pdu` states; unknown keys are skipped.
    """
    if pdu["type"] == "m.room.member":
        authoriser = _authorising_user(pdu, rules)
        if authoriser is not None:
            parsed = user_id_or_error(authoriser) if isinstance(authoriser, str) else "not a string"
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

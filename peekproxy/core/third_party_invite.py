"""The third-party invite rule (rooms/vN §Authorization rules, ``m.room.member`` with
``membership: invite`` and ``content.third_party_invite``), for
:mod:`peekproxy.core.auth_rules`.

Pure: no I/O. The ``signed`` block is verified with signedjson (ed25519) against the public
keys of the room's ``m.room.third_party_invite`` event named by ``signed.token``, as
Synapse 1.163.2 does (``_verify_third_party_invite``): a key that does not verify is
skipped; any other malformed part (a key that is not base64, ``public_keys`` that is not a
list of objects ...) raises ``TypeError``/``ValueError``/``AttributeError``, which the
caller counts as a rejection (Synapse raises and drops the event).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from signedjson.key import decode_verify_key_bytes
from signedjson.sign import SignatureVerifyException, verify_signed_json
from unpaddedbase64 import decode_base64

from peekproxy.core.power_levels import StateMap

__all__ = ["third_party_invite_is_valid"]


def third_party_invite_is_valid(event: Mapping[str, Any], state: StateMap) -> bool:
    """Whether an invite ``event`` made from a third-party invite is valid against
    ``state`` ((type, state_key) → PDU): its ``signed`` names the target (``mxid``) and a
    ``token`` whose ``m.room.third_party_invite`` was sent by the same sender, and is
    signed (ed25519) with one of that event's public keys (``public_key``,
    ``public_keys``). The ban check is the caller's.

    Raises:
        KeyError, TypeError, ValueError, AttributeError: a malformed part (see the module
            notes).
    """
    third_party_invite = event["content"]["third_party_invite"]
    if not isinstance(third_party_invite, Mapping) or "signed" not in third_party_invite:
        return False
    signed = third_party_invite["signed"]
    if not isinstance(signed, Mapping) or not {"mxid", "token", "signatures"} <= signed.keys():
        return False
    invite = state.get(("m.room.third_party_invite", signed["token"]))
    if invite is None or invite["sender"] != event["sender"]:
        return False
    if signed["mxid"] != event["state_key"]:
        return False
    for public_key in _public_keys(invite["content"]):
        try:
            if _signed_by(signed, public_key["public_key"]):
                return True
        except (KeyError, SignatureVerifyException):
            continue
    return False


def _public_keys(content: Mapping[str, Any]) -> list[Any]:
    keys: list[Any] = []
    if "public_key" in content:
        keys.append({"public_key": content["public_key"]})
    keys.extend(content.get("public_keys", []))
    return keys


def _signed_by(signed: Mapping[str, Any], public_key: Any) -> bool:
    """Whether the first ed25519 signature in ``signed`` verifies with ``public_key``
    (unpadded base64); raises ``SignatureVerifyException`` when it does not."""
    for server, signature_block in signed["signatures"].items():
        for key_name in signature_block.keys():  # noqa: SIM118 (a string must raise)
            if not key_name.startswith("ed25519:"):
                continue
            verify_key = decode_verify_key_bytes(key_name, decode_base64(public_key))
            verify_signed_json(signed, server, verify_key)  # type: ignore[arg-type]
            return True
    return False

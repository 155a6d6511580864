"""Which state events end the peeking of their room (protocol.md decision 10).

A room may be peeked while its ``m.room.history_visibility`` is ``world_readable`` and it is
not encrypted (MSC2444 §Peeking: a peek is refused otherwise; MSC2753 likewise for clients).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["ending_reason", "unpeekable_reason"]


def unpeekable_reason(pdu: Mapping[str, Any]) -> str | None:
    """Decision 10: a state event that ends peeking of its room. Returns why (a phrase for
    logs and the subscription's error), or ``None`` when ``pdu`` changes nothing."""
    if pdu.get("state_key") != "":
        return None
    content = pdu.get("content") if isinstance(pdu.get("content"), dict) else {}
    assert isinstance(content, dict)
    if (
        pdu.get("type") == "m.room.history_visibility"
        and content.get("history_visibility") != "world_readable"
    ):
        return f"history_visibility changed to {content.get('history_visibility')!r}"
    if pdu.get("type") == "m.room.encryption":
        return "encryption was enabled"
    return None


def ending_reason(pdus: Iterable[Mapping[str, Any]]) -> str | None:
    """Why the newest of ``pdus`` (oldest first) that ends peeking does so
    (:func:`unpeekable_reason`), or ``None`` when none does."""
    found = None
    for pdu in pdus:
        found = unpeekable_reason(pdu) or found
    return found

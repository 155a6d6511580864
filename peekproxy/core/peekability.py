"""Which state events end the peeking of their room (protocol.md decision 10).

A room may be peeked while its ``m.room.history_visibility`` is ``world_readable`` and it is
not encrypted (MSC2444 §Peeking: a peek is refused otherwise; MSC2753 likewise for clients).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from peekproxy.core.server_acl import server_allowed

__all__ = [
    "acl_denial_reason",
    "ending_reason",
    "observer_removed_reason",
    "unpeekable_reason",
]


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


def observer_removed_reason(pdus: Iterable[Mapping[str, Any]], observer: str) -> str | None:
    """Why the observer (user ID ``observer``) is out of the room after ``pdus`` (oldest
    first): the newest ``m.room.member`` event of it, when that is not a join (a kick or a
    ban: ``"the observer was removed (leave by @mod:a.test: spam)"``), else ``None``.
    An observer join followed that way cannot go on; its peeks end."""
    found = None
    for pdu in pdus:
        if pdu.get("type") != "m.room.member" or pdu.get("state_key") != observer:
            continue
        content = pdu.get("content")
        membership = content.get("membership") if isinstance(content, Mapping) else None
        if membership == "join":
            found = None
            continue
        reason = content.get("reason") if isinstance(content, Mapping) else None
        found = f"the observer was removed ({str(membership)[:20]} by {str(pdu.get('sender'))[:80]}"
        found += f": {reason[:120]})" if isinstance(reason, str) and reason else ")"
    return found


def acl_denial_reason(pdus: Iterable[Mapping[str, Any]], server_name: str) -> str | None:
    """Why ``server_name`` may no longer follow the room after ``pdus`` (oldest first): the
    newest ``m.room.server_acl`` among them denies it
    (:func:`~peekproxy.core.server_acl.server_allowed`), or ``None``. Synapse then refuses
    every request of the denied server, even its leave, but keeps pushing events: the peeks
    end at once (docs/observer-join.md)."""
    found = None
    for pdu in pdus:
        if pdu.get("type") != "m.room.server_acl" or pdu.get("state_key") != "":
            continue
        content = pdu.get("content")
        allowed = server_allowed(content if isinstance(content, Mapping) else {}, server_name)
        found = None if allowed else f"the room's server ACL denies {server_name}"
    return found

"""Ephemeral events of a federation transaction, split per user (pure).

SSAPI §Typing Notifications (``m.typing``) and §Receipts (``m.receipt``): one EDU may speak
of several users (receipts); peekproxy keeps one row per (room, EDU type, user).
"""

from __future__ import annotations

from typing import Any

from peekproxy.core.identifiers import InvalidIdentifier, UserId
from peekproxy.core.nul import has_nul

__all__ = ["per_user_edus"]


def per_user_edus(edu: Any) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(room ID, EDU type, user ID, content for that user alone) for each user an
    ``m.typing`` / ``m.receipt`` EDU speaks of (SSAPI §Typing Notifications, §Receipts);
    malformed parts (U+0000 in a room ID, user ID or receipt type included: the store indexes
    them, :mod:`peekproxy.core.nul`) and other EDUs give nothing. Content: ``m.typing``
    ``{"room_id", "user_id", "typing": bool}``; ``m.receipt``
    ``{receipt_type: {user_id: receipt}}``."""
    if not isinstance(edu, dict) or not isinstance(edu.get("content"), dict):
        return []
    kind, content = edu.get("edu_type"), edu["content"]

    def user(value: Any) -> bool:
        if has_nul(value):
            return False
        try:
            UserId.parse(value)
        except InvalidIdentifier:
            return False
        return True

    if kind == "m.typing":
        room_id, user_id, typing = (content.get(k) for k in ("room_id", "user_id", "typing"))
        if (
            isinstance(room_id, str)
            and not has_nul(room_id)
            and user(user_id)
            and isinstance(typing, bool)
        ):
            return [
                (room_id, kind, user_id, {"room_id": room_id, "user_id": user_id, "typing": typing})
            ]
        return []
    if kind == "m.receipt":
        found = []
        for room_id, by_type in content.items():
            if not (isinstance(room_id, str) and isinstance(by_type, dict)) or has_nul(room_id):
                continue
            for receipt_type, users in by_type.items():
                if not isinstance(users, dict) or has_nul(receipt_type):
                    continue
                for user_id, receipt in users.items():
                    if user(user_id) and isinstance(receipt, dict):
                        found.append((room_id, kind, user_id, {receipt_type: {user_id: receipt}}))
        return found
    return []

"""Events the authorization rules reject, made on purpose: the ``relay_illegal`` fault.

A buggy or malicious server can send its peers events its room's rules forbid, correctly
hashed and signed, so that only the receiver's authorization rules (SSAPI §Checks performed
on receipt of a PDU, steps 4-6) can catch them. :func:`make_illegal` makes one of the kinds
issue 14 names in a :class:`~peekproxy.testbed.rooms.TestbedRoom`, with
:meth:`~peekproxy.testbed.rooms.TestbedRoom.send_illegal`: the event enters the room's DAG
(later events' ``prev_events`` point at it) but never its state.
"""

from __future__ import annotations

import copy
from typing import Any

from signedjson.types import SigningKey

from peekproxy.testbed.rooms import RoomError, TestbedRoom

__all__ = ["ILLEGAL_KINDS", "make_illegal"]

#: The kinds of illegal event :func:`make_illegal` makes, and what each one is.
ILLEGAL_KINDS: dict[str, str] = {
    "non_member_message": "an m.room.message from a user who is not in the room",
    "power_levels": "an m.room.power_levels change (the sender raised to 100) by a user "
    "below the m.room.power_levels level",
    "ban": "a ban of the target (default: the room's creator) by a user below the ban level",
    "cites_create": "room version 12 only: an m.room.message whose auth_events cite the "
    "create event (MSC4291 forbids it)",
}


def make_illegal(
    room: TestbedRoom,
    signing_key: SigningKey,
    *,
    kind: str,
    sender: str,
    target: str | None,
    now_ms: int,
) -> tuple[str, dict[str, Any], str]:
    """Make one illegal event of ``kind`` (:data:`ILLEGAL_KINDS`) sent by ``sender`` (a full
    user ID of this server) at ``now_ms`` (ms since the epoch), signed with
    ``signing_key``.

    Returns:
        ``(event_id, pdu, reason)``, the reason being the auth rules' verdict.

    Raises:
        RoomError: an unknown kind, ``target`` given for a kind other than ``ban``,
            ``cites_create`` outside room version 12, or an event the auth rules would
            allow after all (e.g. a ban by a moderator).
    """
    if kind not in ILLEGAL_KINDS:
        raise RoomError(f"unknown kind {kind!r}; known: {', '.join(ILLEGAL_KINDS)}")
    if target is not None and kind != "ban":
        raise RoomError(f"'target' is for kind 'ban' only, not {kind!r}")
    body = {"msgtype": "m.text", "body": f"illegal event ({kind}) from {sender}"}
    if kind == "non_member_message":
        return room.send_illegal(
            signing_key, sender=sender, type="m.room.message", content=body, now_ms=now_ms
        )
    if kind == "cites_create":
        if room.rules.identifier != "12":
            raise RoomError("cites_create needs a room version 12 room")
        return room.send_illegal(
            signing_key,
            sender=sender,
            type="m.room.message",
            content=body,
            now_ms=now_ms,
            cite_create=True,
        )
    if kind == "ban":
        return room.send_illegal(
            signing_key,
            sender=sender,
            type="m.room.member",
            state_key=target or room.creators()[0],
            content={"membership": "ban", "reason": "illegal ban"},
            now_ms=now_ms,
        )
    current = room.state_event("m.room.power_levels")
    content: dict[str, Any] = copy.deepcopy(current["content"]) if current else {}
    users = content.get("users")
    content["users"] = {**(users if isinstance(users, dict) else {}), sender: 100}
    return room.send_illegal(
        signing_key,
        sender=sender,
        type="m.room.power_levels",
        state_key="",
        content=content,
        now_ms=now_ms,
    )

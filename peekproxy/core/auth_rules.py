"""The authorization rules of room versions 1-12 (rooms/vN §Authorization rules), as used by
the checks on receipt of a PDU, steps 4-6 (SSAPI §Checks performed on receipt of a PDU).

Pure: no I/O. Events are PDUs in federation format (mappings as parsed from JSON) that
passed steps 1-3 (:func:`peekproxy.core.pdu.check_pdu`); their IDs are passed beside them
(v3+ PDUs carry none). The version differences come from
:class:`peekproxy.core.room_versions.AuthRules` (``rules.auth``); no code here tests
version numbers.

Where Synapse (the implementation the differential tests compare with,
``synapse.event_auth``) and the spec disagree, this module follows Synapse, so that
peekproxy shows exactly what a Synapse member of the room would show (docs/federation.md
lists the differences).

A verdict is ``None`` (allowed) or a one-line reason (rejected).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from peekproxy.core.room_versions import RoomVersion

__all__ = [
    "StateKey",
    "auth_types_for_event",
    "check_against_state",
    "check_event_auth",
    "create_event_id",
]

#: A state map's key: (event type, state_key).
StateKey = tuple[str, str]


def create_event_id(room_id: str) -> str:
    """The ID of a v12 room's create event: ``"$"`` + the room ID without its ``"!"``
    (rooms/v12, MSC4291)."""
    return "$" + room_id[1:]


def auth_types_for_event(event: Mapping[str, Any], rules: RoomVersion) -> set[StateKey]:
    """The (type, state_key) pairs an event's ``auth_events`` may hold (SSAPI §Auth events
    selection): create (not in v12, where it is implied), power levels, the sender's
    membership; for ``m.room.member`` also the target's membership, the join rules for
    join/invite/knock, the ``m.room.third_party_invite`` named by
    ``content.third_party_invite.signed.token`` for invites, and (v8+) the authorising
    user's membership for restricted joins."""
    raise NotImplementedError


def check_event_auth(
    event_id: str,
    event: Mapping[str, Any],
    auth_events: Mapping[str, Mapping[str, Any]],
    rules: RoomVersion,
    *,
    rejected: Collection[str] = (),
) -> str | None:
    """Receipt step 4: is ``event`` allowed by the auth rules, judged by its own
    ``auth_events``?

    Args:
        event_id: the event's ID.
        event: the PDU.
        auth_events: event ID → PDU for (at least) every ID the event cites in its
            ``auth_events``; in v12 also the room's create event under
            :func:`create_event_id`. Extra entries are ignored.
        rules: the room's version.
        rejected: IDs of events known to be rejected; an event citing one is rejected.

    Returns:
        ``None`` when allowed, else a one-line reason. A cited auth event that is neither in
        ``auth_events`` nor ``rejected`` is a rejection too ("auth event … unknown"); the
        caller fetches missing auth events before asking. Checks rule 1 (create), the
        auth-events rules (same room, no duplicate (type, state_key), only the types of
        :func:`auth_types_for_event`, the create present — cited in v1-v11, not cited in
        v12 — none rejected), then every state-dependent rule with the cited events as the
        state.
    """
    raise NotImplementedError


def check_against_state(
    event_id: str,
    event: Mapping[str, Any],
    state: Mapping[StateKey, Mapping[str, Any]],
    rules: RoomVersion,
) -> str | None:
    """Receipt steps 5 (the state before the event) and 6 (the room's current state: soft
    failure): the state-dependent auth rules with the auth events selected from ``state``
    ((type, state_key) → PDU; entries not among :func:`auth_types_for_event` are ignored;
    in v12 the create event is looked up under ``("m.room.create", "")`` as in any state).

    Returns:
        ``None`` when allowed, else a one-line reason.
    """
    raise NotImplementedError

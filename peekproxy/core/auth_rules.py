"""The authorization rules of room versions 1-12 (rooms/vN §Authorization rules), as used by
the checks on receipt of a PDU, steps 4-6 (SSAPI §Checks performed on receipt of a PDU).

Pure: no I/O. Events are PDUs in federation format (mappings as parsed from JSON) that
passed steps 1-3 (:func:`peekproxy.core.pdu.check_pdu`); their IDs are passed beside them
(v3+ PDUs carry none). The version differences come from
:class:`peekproxy.core.room_versions.AuthRules` (``rules.auth``); no code here tests
version numbers.

Where Synapse (the implementation the differential tests compare with,
``synapse.event_auth`` 1.163.2) and the spec disagree, this module follows Synapse, so that
peekproxy shows exactly what a Synapse member of the room would show (docs/federation.md
lists the differences). Among them: ``m.federate: false`` also rejects a membership whose
*target* is on another server; v1-v9 levels are read with Python's ``int()``; a v3+
redaction always passes here; a knock before v7 is an unknown membership; without a
previous power-levels event a new one passes the power-levels rule; the creator's join is
allowed only when its ``prev_events`` is exactly the create event; a v1/v2 redaction whose
``redacts`` is not a string passes; v12 ``additional_creators`` are user IDs as Synapse
parses them. Content Synapse cannot read (a member event without ``membership``, a level
``int()`` refuses, a third-party invite without ``signed.token`` ...) makes Synapse raise
and drop the event; here it is rejected ("malformed ...").

A verdict is ``None`` (allowed) or a one-line reason (rejected).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from peekproxy.core.events import compute_event_id, event_refs
from peekproxy.core.power_levels import (
    CREATE_KEY,
    AuthRejected,
    StateKey,
    StateMap,
    check_power_levels,
    creator_of,
    domain_of,
    named_level,
    send_level,
    user_level,
    valid_additional_creators_problem,
)
from peekproxy.core.room_versions import KNOWN_ROOM_VERSIONS, RoomVersion
from peekproxy.core.third_party_invite import third_party_invite_is_valid

__all__ = [
    "StateKey",
    "auth_types_for_event",
    "check_against_state",
    "check_event_auth",
    "create_event_id",
]

#: What a malformed event or auth event raises in the rules (a level ``int()`` refuses, a
#: member event without ``membership``, ``users`` not an object ...). Synapse raises too
#: and drops the event; here it is a rejection.
_MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError)

_MEMBER = "m.room.member"


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
    user's membership for restricted joins.

    The create event is listed in every version (as Synapse lists it): in v12 it is an
    auth event that the PDU does not cite. Like Synapse, ``knock`` adds the join rules in
    every version, before v7 too.

    Raises:
        ValueError: a member event without ``state_key`` or ``content.membership``, or an
            invite whose ``content.third_party_invite`` has no ``signed.token``.
    """
    try:
        return _auth_types(event, rules)
    except _MALFORMED as e:
        raise ValueError(f"malformed event: {e!r}") from None


def _auth_types(event: Mapping[str, Any], rules: RoomVersion) -> set[StateKey]:
    if event["type"] == "m.room.create":
        return set()
    types: set[StateKey] = {
        ("m.room.power_levels", ""),
        (_MEMBER, event["sender"]),
        CREATE_KEY,
    }
    if event["type"] != _MEMBER:
        return types
    content = event["content"]
    membership = content["membership"]
    if membership in ("join", "invite", "knock"):
        types.add(("m.room.join_rules", ""))
    types.add((_MEMBER, event["state_key"]))
    if membership == "invite" and "third_party_invite" in content:
        types.add(("m.room.third_party_invite", content["third_party_invite"]["signed"]["token"]))
    restricted = rules.auth.restricted_join_rule and membership == "join"
    if restricted and "join_authorised_via_users_server" in content:
        types.add((_MEMBER, content["join_authorised_via_users_server"]))
    return types


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
    try:
        if event["type"] == "m.room.create":
            _check_create(event, rules)
            return None
        state, create_id = _cited_state(event_id, event, auth_events, rules, rejected)
        _check_state_dependent(event_id, event, state, rules, lambda: create_id)
    except AuthRejected as e:
        return str(e)
    except _MALFORMED as e:
        return f"malformed event or auth event: {e!r}"
    return None


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
    if event.get("type") == "m.room.create":
        return None

    def create_id() -> str:
        return compute_event_id(state[CREATE_KEY], rules)

    try:
        _check_state_dependent(event_id, event, state, rules, create_id)
    except AuthRejected as e:
        return str(e)
    except _MALFORMED as e:
        return f"malformed event or state: {e!r}"
    return None


def _check_create(event: Mapping[str, Any], rules: RoomVersion) -> None:
    """Rule 1: an ``m.room.create`` event."""
    if event["prev_events"]:
        raise AuthRejected("m.room.create has prev_events")
    if rules.auth.create_event_implied:
        if "room_id" in event:
            raise AuthRejected("m.room.create has a room_id")
    elif domain_of(event["room_id"]) != domain_of(event["sender"]):
        raise AuthRejected("m.room.create: the room ID's domain is not the sender's")
    content = event["content"]
    if content.get("room_version", "1") not in KNOWN_ROOM_VERSIONS:
        raise AuthRejected(f"m.room.create: unknown room_version {content['room_version']!r}")
    if not rules.auth.implicit_room_creator and "creator" not in content:
        raise AuthRejected("m.room.create has no content.creator")
    if rules.auth.privileged_creators and "additional_creators" in content:
        problem = valid_additional_creators_problem(content["additional_creators"])
        if problem is not None:
            raise AuthRejected(f"m.room.create: {problem}")


def _cited_state(
    event_id: str,
    event: Mapping[str, Any],
    auth_events: Mapping[str, Mapping[str, Any]],
    rules: RoomVersion,
    rejected: Collection[str],
) -> tuple[dict[StateKey, Mapping[str, Any]], str]:
    """Rule 2 (the auth events themselves); returns them as a state map and the create
    event's ID."""
    cited = event_refs(event["auth_events"])
    room_id = event["room_id"]
    if rules.auth.create_event_implied:
        implied = create_event_id(room_id)
        if implied in cited:
            raise AuthRejected("auth_events must not contain the create event")
        cited.append(implied)
    expected = _auth_types(event, rules)
    state: dict[StateKey, Mapping[str, Any]] = {}
    ids: dict[StateKey, str] = {}
    for auth_id in cited:
        if auth_id in rejected:
            raise AuthRejected(f"auth event {auth_id} was rejected")
        auth_event = auth_events.get(auth_id)
        if auth_event is None:
            raise AuthRejected(f"auth event {auth_id} is unknown")
        if _room_of(auth_id, auth_event, rules) != room_id:
            raise AuthRejected(f"auth event {auth_id} is in another room")
        key = (auth_event["type"], auth_event.get("state_key"))
        if key in state:
            raise AuthRejected(f"two auth events for {key}: {ids[key]} and {auth_id}")
        if key not in expected:
            raise AuthRejected(f"auth event {auth_id} for {key} is not one of its auth types")
        state[key] = auth_event
        ids[key] = auth_id
    if CREATE_KEY not in ids:
        raise AuthRejected("no m.room.create event in auth_events")
    return state, ids[CREATE_KEY]


def _room_of(event_id: str, pdu: Mapping[str, Any], rules: RoomVersion) -> object:
    """An event's room ID; a v12 create event has none and founds ``!`` + its ID's hash."""
    if rules.auth.create_event_implied and pdu["type"] == "m.room.create":
        return "!" + event_id[1:]
    return pdu.get("room_id")


def _state_key(event: Mapping[str, Any]) -> str:
    """The event's ``state_key`` where a rule needs one (Synapse raises without it)."""
    if "state_key" not in event:
        raise AuthRejected(f"a {event['type']} event without state_key")
    state_key: str = event["state_key"]
    return state_key


def _check_state_dependent(
    event_id: str,
    event: Mapping[str, Any],
    state: StateMap,
    rules: RoomVersion,
    create_id: Callable[[], str],
) -> None:
    """Rules 2 onwards that read the state (v12 numbering: 3 m.federate, 4 aliases v1-v5,
    5 membership, 6 sender joined, 7 third-party invite, 8 send level, 9 others' user-ID
    state keys, 10 power levels, 11 redactions v1-v2)."""
    create = state.get(CREATE_KEY)
    if create is None:
        raise AuthRejected("no m.room.create event in the auth events")
    sender = event["sender"]
    if domain_of(create["sender"]) != domain_of(sender) and not _can_federate(create):
        raise AuthRejected("the room is not federated (m.federate: false)")
    if event["type"] == "m.room.aliases" and rules.auth.special_case_aliases_auth:
        if not event.get("state_key"):
            raise AuthRejected("m.room.aliases needs a non-empty state_key")
        if event["state_key"] != domain_of(sender):
            raise AuthRejected("m.room.aliases: the state_key is not the sender's domain")
        return
    if event["type"] == _MEMBER:
        _check_membership(event, state, rules, create_id)
        return
    _require_joined(sender, state)
    if event["type"] == "m.room.third_party_invite":
        if user_level(sender, state, rules) < named_level(state, "invite", 0):
            raise AuthRejected("the sender may not invite (m.room.third_party_invite)")
        return
    state_key = event.get("state_key")
    if user_level(sender, state, rules) < send_level(event["type"], state_key, state):
        raise AuthRejected(f"the sender's level is below the level to send {event['type']}")
    if state_key is not None and state_key.startswith("@") and state_key != sender:
        raise AuthRejected("a state_key that is another user's ID")
    if event["type"] == "m.room.power_levels":
        check_power_levels(event, _state_key(event), state, rules)
    elif event["type"] == "m.room.redaction":
        _check_redaction(event_id, event, state, rules)


def _can_federate(create: Mapping[str, Any]) -> bool:
    return create["content"].get("m.federate", True) is True


def _membership(member_event: Mapping[str, Any] | None) -> Any:
    return None if member_event is None else member_event["content"]["membership"]


def _require_joined(user_id: object, state: StateMap) -> None:
    if _membership(state.get((_MEMBER, user_id))) != "join":  # type: ignore[arg-type]
        raise AuthRejected(f"{user_id} is not joined to the room")


def _check_membership(
    event: Mapping[str, Any], state: StateMap, rules: RoomVersion, create_id: Callable[[], str]
) -> None:
    """Rule 5 (``m.room.member``), in Synapse's order."""
    membership = event["content"]["membership"]
    sender = event["sender"]
    create = state[CREATE_KEY]
    prev_events = event_refs(event["prev_events"])
    first_join = membership == "join" and len(prev_events) == 1 and prev_events[0] == create_id()
    if first_join and creator_of(create, rules) == _state_key(event):
        return  # the creator's first join (Synapse: only right after the create event)
    target = _state_key(event)
    if domain_of(create["sender"]) != domain_of(target) and not _can_federate(create):
        raise AuthRejected("the room is not federated (m.federate: false)")
    caller = _membership(state.get((_MEMBER, sender)))
    caller_knocked = rules.auth.knock_join_rule and caller == "knock"
    target_membership = _membership(state.get((_MEMBER, target)))
    join_rules = state.get(("m.room.join_rules", ""))
    join_rule = "invite" if join_rules is None else join_rules["content"].get("join_rule", "invite")
    sender_level = user_level(sender, state, rules)
    target_level = user_level(target, state, rules)
    invite_level = named_level(state, "invite", 0)
    ban_level = named_level(state, "ban", 50)

    if membership == "invite" and "third_party_invite" in event["content"]:
        if not third_party_invite_is_valid(event, state):
            raise AuthRejected("the third-party invite is not valid")
        if target_membership == "ban":
            raise AuthRejected(f"{target} is banned")
        return
    if membership not in ("join", "knock"):
        if (caller == "invite" or caller_knocked) and membership == "leave" and target == sender:
            return  # rejecting an invite or withdrawing a knock
        if caller != "join":
            raise AuthRejected(f"{sender} is not joined to the room")
    if membership == "invite":
        if target_membership == "ban":
            raise AuthRejected(f"{target} is banned")
        if target_membership == "join":
            raise AuthRejected(f"{target} is already joined")
        if sender_level < invite_level:
            raise AuthRejected("the sender's level is below the invite level")
    elif membership == "join":
        _check_join(event, state, rules, caller, target_membership, join_rule, invite_level)
    elif membership == "leave":
        if target_membership == "ban" and sender_level < ban_level:
            raise AuthRejected("the sender's level is below the ban level (unban)")
        kick_level = named_level(state, "kick", 50) if target != sender else None
        if kick_level is not None and (sender_level < kick_level or sender_level <= target_level):
            raise AuthRejected(f"the sender may not kick {target}")
    elif membership == "ban":
        if sender_level < ban_level:
            raise AuthRejected("the sender's level is below the ban level")
        if sender_level <= target_level:
            raise AuthRejected(f"the sender's level is not above {target}'s")
    elif rules.auth.knock_join_rule and membership == "knock":
        _check_knock(sender, target, caller, target_membership, join_rule, rules)
    else:
        raise AuthRejected(f"unknown membership {membership!r}")


def _restricted(join_rule: Any, rules: RoomVersion) -> bool:
    return (rules.auth.restricted_join_rule and join_rule == "restricted") or (
        rules.auth.knock_restricted_join_rule and join_rule == "knock_restricted"
    )


def _check_join(
    event: Mapping[str, Any],
    state: StateMap,
    rules: RoomVersion,
    caller: Any,
    target_membership: Any,
    join_rule: Any,
    invite_level: int,
) -> None:
    """Rule 5.2 (``join``), with restricted joins (v8+) as Synapse checks them first."""
    if event["sender"] != event["state_key"]:
        raise AuthRejected("a join for another user")
    if target_membership == "ban":
        raise AuthRejected("the sender is banned")
    if join_rule == "public":
        return
    if _restricted(join_rule, rules):
        if caller in ("join", "invite"):
            return
        authoriser = event["content"].get("join_authorised_via_users_server")
        if authoriser is None:
            raise AuthRejected("a restricted join without join_authorised_via_users_server")
        _require_joined(authoriser, state)
        if user_level(authoriser, state, rules) < invite_level:
            raise AuthRejected("the authorising user's level is below the invite level")
        return
    if (
        join_rule == "invite"
        or (rules.auth.knock_join_rule and join_rule == "knock")
        or (rules.auth.knock_restricted_join_rule and join_rule == "knock_restricted")
    ):
        if caller not in ("join", "invite"):
            raise AuthRejected("the sender is not invited")
        return
    raise AuthRejected(f"join rule {join_rule!r} does not allow joining")


def _check_knock(
    sender: str,
    target: str,
    caller: Any,
    target_membership: Any,
    join_rule: Any,
    rules: RoomVersion,
) -> None:
    """Rule 5.6 (``knock``, v7+; ``knock_restricted`` v10+)."""
    if join_rule != "knock" and not (
        rules.auth.knock_restricted_join_rule and join_rule == "knock_restricted"
    ):
        raise AuthRejected(f"join rule {join_rule!r} does not allow knocking")
    if target != sender:
        raise AuthRejected("a knock for another user")
    if target_membership == "join":
        raise AuthRejected("the sender is already joined")
    if caller == "invite":
        raise AuthRejected("the sender is already invited")
    if target_membership == "ban":
        raise AuthRejected("the sender is banned")


def _check_redaction(
    event_id: str, event: Mapping[str, Any], state: StateMap, rules: RoomVersion
) -> None:
    """Rule 11 (v1-v2): below the ``redact`` level, only events of the sender's own
    server (by event ID). v3+ always passes here; whether a redaction applies is decided
    when it is shown."""
    if user_level(event["sender"], state, rules) >= named_level(state, "redact", 50):
        return
    if not rules.auth.redaction_checks_event_id_domain:
        return
    own_domain = domain_of(event_id)
    redacts = event.get("redacts")
    if not isinstance(redacts, str):
        return  # Synapse: a non-string "redacts" passes
    if domain_of(redacts) != own_domain:
        raise AuthRejected("the sender may not redact another server's events")

"""Power levels as the authorization rules read them (rooms/vN §Authorization rules, the
``m.room.power_levels`` rules and the "Definitions" of user and required power levels).

Pure: no I/O. A *state* here is a mapping (type, state_key) → PDU holding at least the
room's ``m.room.create`` event (the auth events of an event, or a room's state).
:func:`check_power_levels` is rule 10 (v12 numbering) for a new ``m.room.power_levels``
event; the other functions read levels for the rest of the rules in
:mod:`peekproxy.core.auth_rules`.

Levels are read as Synapse 1.163.2 reads them (``synapse.event_auth``), which is what the
differential tests compare with:

* v1-v9 read every level with Python's ``int()``: strings such as ``" 50 "``, ``"+50"``,
  ``"5_0"`` or ``"٥٠"``, booleans and (v1-v5, where floats are valid JSON) ``50.9`` → 50
  all count; the spec says "an integer, or a string that is an integer".
* v10+ (MSC3667) a new power-levels event must hold JSON integers (booleans refused).
* v12 (MSC4289) the creators have a level above any other (:data:`CREATOR_POWER_LEVEL`).

A rule that rejects raises :class:`AuthRejected`; a malformed value (a level ``int()``
refuses, ``users`` not an object) raises ``ValueError``/``TypeError``/``AttributeError``,
which :mod:`peekproxy.core.auth_rules` also counts as rejected (Synapse raises and drops
the event).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from peekproxy.core.room_versions import RoomVersion

__all__ = [
    "CREATE_KEY",
    "CREATOR_POWER_LEVEL",
    "POWER_LEVELS_KEY",
    "AuthRejected",
    "StateKey",
    "StateMap",
    "check_power_levels",
    "creator_of",
    "domain_of",
    "named_level",
    "send_level",
    "user_level",
    "valid_additional_creators_problem",
]

#: A state map's key: (event type, state_key).
StateKey = tuple[str, str]
#: (type, state_key) → PDU.
StateMap = Mapping[StateKey, Mapping[str, Any]]

CREATE_KEY: StateKey = ("m.room.create", "")
POWER_LEVELS_KEY: StateKey = ("m.room.power_levels", "")

#: rooms/v12 (MSC4289): the creators' level is "infinite"; Synapse uses 2**53, above any
#: level a v12 power-levels event can hold (canonical JSON integers stop at 2**53 - 1).
CREATOR_POWER_LEVEL = 2**53

#: The top-level power-levels keys that hold one level each.
_NAMED_LEVELS = (
    "users_default",
    "events_default",
    "state_default",
    "ban",
    "redact",
    "kick",
    "invite",
)
#: The keys that map names to levels; ``notifications`` counts from v6 when levels change.
_LEVEL_MAPS = ("events", "notifications", "users")


#: Synapse's host names (``VALID_HOST_REGEX``): labels of letters, digits and ``-``.
_SYNAPSE_HOST = re.compile(r"\A[0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*\Z")


class AuthRejected(Exception):
    """An authorization rule rejects the event; ``str(error)`` is the one-line reason."""


def domain_of(identifier: object) -> str:
    """The server part of ``@user:server`` / ``$id:server``: what follows the first
    ``:`` (as Synapse's ``get_domain_from_id``).

    Raises:
        AuthRejected: not a string with a ``:``.
    """
    if not isinstance(identifier, str) or ":" not in identifier:
        raise AuthRejected(f"invalid ID {identifier!r}")
    return identifier.split(":", 1)[1]


def creator_of(create: Mapping[str, Any], rules: RoomVersion) -> Any:
    """The room's creator: v11+ the create event's ``sender`` (MSC2175), before that its
    ``content.creator`` (whose presence rule 1 checks; any JSON value)."""
    if rules.auth.implicit_room_creator:
        return create["sender"]
    return create["content"]["creator"]


def _is_creator(create: Mapping[str, Any], user_id: object) -> bool:
    """v12 (MSC4289): the create event's sender or one of ``additional_creators``."""
    if create["sender"] == user_id:
        return True
    return user_id in set(create["content"].get("additional_creators", []))


def user_level(user_id: object, state: StateMap, rules: RoomVersion) -> int:
    """A user's power level (rooms/vN §Definitions, "user's power level"): v12 creators
    :data:`CREATOR_POWER_LEVEL`; else ``users[user_id]``, else ``users_default``, else 0;
    without a power-levels event 100 for the creator and 0 for everyone else.

    Raises:
        AuthRejected: ``state`` has no create event.
        ValueError, TypeError, AttributeError: a malformed level (see the module notes).
    """
    create = state.get(CREATE_KEY)
    if create is None:
        raise AuthRejected("no m.room.create event to read power levels against")
    if rules.auth.privileged_creators and _is_creator(create, user_id):
        return CREATOR_POWER_LEVEL
    power_levels = state.get(POWER_LEVELS_KEY)
    if power_levels is None:
        return 100 if creator_of(create, rules) == user_id else 0
    content = power_levels["content"]
    level = content.get("users", {}).get(user_id)
    if level is None:
        level = content.get("users_default", 0)
    return 0 if level is None else int(level)


def named_level(state: StateMap, name: str, default: int) -> int:
    """A top-level level of the power-levels event (``ban``, ``invite``, ``kick``,
    ``redact``), or ``default`` when there is no such event or key (or it is ``null``).

    Raises:
        ValueError, TypeError: the value is not read by ``int()``.
    """
    power_levels = state.get(POWER_LEVELS_KEY)
    if power_levels is None:
        return default
    level = power_levels["content"].get(name)
    return default if level is None else int(level)


def send_level(event_type: str, state_key: str | None, state: StateMap) -> int:
    """The "required power level" to send an event (rooms/vN §Definitions): ``events``
    for its type, else ``state_default`` (50) for state events or ``events_default`` (0).

    Raises:
        ValueError, TypeError, AttributeError: a malformed level.
    """
    power_levels = state.get(POWER_LEVELS_KEY)
    content: Mapping[str, Any] = power_levels["content"] if power_levels is not None else {}
    level = content.get("events", {}).get(event_type)
    if level is None:
        if state_key is not None:
            level = content.get("state_default", 50)
        else:
            level = content.get("events_default", 0)
    return int(level)


def valid_additional_creators_problem(value: object) -> str | None:
    """rooms/v12 rule 1 (MSC4289): ``additional_creators`` must be a list of valid user
    IDs (at most 255 characters and bytes each), valid as Synapse judges user IDs.
    ``None`` when it is, else the reason."""
    if type(value) is not list:
        return "additional_creators must be an array"
    for entry in value:
        if type(entry) is not str:
            return "an entry of additional_creators is not a string"
        if not _synapse_user_id_is_valid(entry):
            return f"an entry of additional_creators is not a valid user ID: {entry[:60]!r}"
        if len(entry) > 255 or len(entry.encode("utf-8")) > 255:
            return "an entry of additional_creators is longer than 255 bytes"
    return None


def _synapse_user_id_is_valid(value: str) -> bool:
    """A user ID as Synapse's ``UserID.is_valid`` sees one, which is what Synapse checks
    ``additional_creators`` with (it is both looser and stricter than the spec's grammar):
    ``@``, any localpart (empty too) up to the first ``:``, then a server name whose host is
    an IPv6 literal in brackets or dot-separated labels of ``A-Za-z0-9-``, and whose
    optional port is anything Python's ``int()`` reads."""
    localpart_and_server = value[1:].split(":", 1)
    if not value.startswith("@") or len(localpart_and_server) != 2:
        return False
    server = localpart_and_server[1]
    host = server
    if not server.endswith("]") and ":" in server:
        host, port = server.rsplit(":", 1)
        try:
            int(port)
        except ValueError:
            return False
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return host.endswith("]")
    return _SYNAPSE_HOST.match(host) is not None


def _check_users_keys(users: Any) -> None:
    for key, value in users.items():
        if not key.startswith("@") or ":" not in key[1:]:  # Synapse's UserID.from_string
            raise AuthRejected(f"power levels: not a valid user ID: {key!r}")
        try:
            int(value)
        except Exception:
            raise AuthRejected(f"power levels: not a valid power level: {value!r}") from None


def _check_creators_not_listed(users: Any, state: StateMap) -> None:
    create = state.get(CREATE_KEY)
    if create is None:
        raise AuthRejected("power levels: no m.room.create event to check creators against")
    if create["sender"] in users:
        raise AuthRejected(f"power levels: the creator {create['sender']} must not be in users")
    additional = create["content"].get("additional_creators", [])
    if additional and set(additional) & set(users):
        raise AuthRejected("power levels: additional creators must not be in users")


def _check_integers(content: Mapping[str, Any]) -> None:
    for key, value in content.items():
        if key in _NAMED_LEVELS and type(value) is not int:
            raise AuthRejected(f"power levels: {key} must be an integer")
        if key in _LEVEL_MAPS and not (
            isinstance(value, Mapping) and all(type(v) is int for v in value.values())
        ):
            raise AuthRejected(f"power levels: {key} must map to integers")


def check_power_levels(
    event: Mapping[str, Any], state_key: str, state: StateMap, rules: RoomVersion
) -> None:
    """The ``m.room.power_levels`` rule (rooms/vN §Authorization rules; v12 rule 10) for a
    new power-levels event judged against ``state``.

    In order: every ``users`` key is a user ID and every value an ``int()`` level; v12 the
    creators are not in ``users``; v10+ every level is a JSON integer; then, when there is
    a previous power-levels event, every named level, ``users``, ``events`` and (v6+)
    ``notifications`` entry that is added, removed or changed must be at most the sender's
    level, and another user's entry equal to the sender's level must not change. Without a
    previous power-levels event nothing more is checked (Synapse; the spec says so too).

    Raises:
        AuthRejected: a rule rejects the event.
        ValueError, TypeError, AttributeError: a malformed level.
    """
    content = event["content"]
    users = content.get("users", {})
    _check_users_keys(users)
    if rules.auth.privileged_creators:
        _check_creators_not_listed(users, state)
    if rules.auth.enforce_int_power_levels:
        _check_integers(content)
    previous = state.get((event["type"], state_key))
    if previous is None:
        return
    sender = event["sender"]
    sender_level = user_level(sender, state, rules)
    old_content = previous["content"]
    checks: list[tuple[str, str | None]] = [(name, None) for name in _NAMED_LEVELS]
    maps = _LEVEL_MAPS if rules.auth.limit_notifications_power_levels else ("events", "users")
    for name in maps:
        old_map = old_content.get(name, {})
        new_map = content.get(name, {})
        checks += [(key, name) for key in set(list(old_map) + list(new_map))]
    for key, map_name in checks:
        old_loc = old_content if map_name is None else old_content.get(map_name, {})
        new_loc = content if map_name is None else content.get(map_name, {})
        old = int(old_loc[key]) if key in old_loc else None
        new = int(new_loc[key]) if key in new_loc else None
        if old is not None and new is not None and old == new:
            continue
        if map_name == "users" and key != sender and old == sender_level:
            raise AuthRejected(f"power levels: cannot change {key}'s level, equal to the sender's")
        if (old is not None and old > sender_level) or (new is not None and new > sender_level):
            where = key if map_name is None else f"{map_name}.{key}"
            raise AuthRejected(f"power levels: {where} above the sender's level {sender_level}")

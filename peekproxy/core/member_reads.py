"""What a member of a room answers other servers from its stored events (pure rules).

When peekproxy is joined to a room as the observer (docs/observer-join.md), the room's other
servers may ask it, as they ask any member, for events (server-server API §Retrieving events,
§Backfilling and retrieving missing events). These rules decide those answers over stored
events, which the caller hands in through a :data:`Lookup` (event ID → stored PDU of *this
room*, or ``None``): the walks never leave the room and never go through an event that is
not stored.

* :func:`host_in_room`: whether a server has a joined member (Synapse's "Host not in room.").
* :func:`federation_pdu`: a stored PDU as served (redacted when stored redacted).
* :func:`backfill_ids`: ``GET /backfill``, newest first, the starting events included.
* :func:`missing_event_ids`: ``POST /get_missing_events``, oldest first.
* :func:`auth_chain_ids`: the auth chain of a set of events.
* :func:`state_before`: the state before an event, when the current state tells it exactly.

The shapes and limits follow what Synapse 1.163 answers (research §6 of issue 13):
``/backfill`` at most :data:`BACKFILL_MAX` events, ``get_missing_events`` at most
:data:`MISSING_EVENTS_MAX`.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from peekproxy.core.events import event_refs, redact
from peekproxy.core.room_versions import EventIdFormat, RoomVersion

__all__ = [
    "BACKFILL_MAX",
    "MISSING_EVENTS_MAX",
    "PRIOR_STATE_IN_AUTH_EVENTS",
    "Lookup",
    "auth_chain_ids",
    "backfill_ids",
    "federation_pdu",
    "host_in_room",
    "missing_event_ids",
    "state_before",
]

#: Event ID → the stored PDU of an event of the room, ``None`` when it is not stored (or is
#: an event of another room).
Lookup = Callable[[str], Mapping[str, Any] | None]

#: ``/backfill`` answers at most this many PDUs (Synapse: ``min(limit, 100)``).
BACKFILL_MAX = 100
#: ``get_missing_events`` answers at most this many (Synapse: ``min(limit, 20)``).
MISSING_EVENTS_MAX = 20
#: State event types whose previous holder the event's own ``auth_events`` name (SSAPI §Auth
#: events selection: the current power levels; the target's current member event).
PRIOR_STATE_IN_AUTH_EVENTS = frozenset({"m.room.member", "m.room.power_levels"})

StateMap = dict[tuple[str, str], str]


def _depth(pdu: Mapping[str, Any]) -> int:
    depth = pdu.get("depth")
    return depth if isinstance(depth, int) and not isinstance(depth, bool) else 0


def _state_key(pdu: Mapping[str, Any]) -> tuple[str, str] | None:
    event_type, state_key = pdu.get("type"), pdu.get("state_key")
    if isinstance(event_type, str) and isinstance(state_key, str):
        return event_type, state_key
    return None


def host_in_room(memberships: Iterable[tuple[str, str | None]], server_name: str) -> bool:
    """Whether any of ``memberships`` ((user ID, membership) of the room's current state)
    is a ``join`` of a user of ``server_name`` (exactly the user ID's server part, port
    included)."""
    return any(
        membership == "join" and user_id.partition(":")[2] == server_name
        for user_id, membership in memberships
    )


def federation_pdu(pdu: Mapping[str, Any], *, redacted: bool, rules: RoomVersion) -> dict[str, Any]:
    """A stored PDU as served over federation: through the room version's redaction
    algorithm when stored redacted; without ``unsigned`` (what another server put there is
    not ours to repeat); without ``event_id`` from room version 3 on (rooms/v3 §Event IDs)."""
    out = redact(pdu, rules) if redacted else {k: v for k, v in pdu.items() if k != "unsigned"}
    if rules.event_id_format is not EventIdFormat.EVENT_ID_FIELD:
        out.pop("event_id", None)
    return out


def backfill_ids(starts: Sequence[str], limit: int, lookup: Lookup) -> list[str]:
    """``GET /backfill`` (SSAPI §Backfilling): the stored events among ``starts`` and their
    stored ancestors through ``prev_events``, newest first (highest ``depth``; then by event
    ID), at most ``limit`` (clamped to 1..:data:`BACKFILL_MAX`). Events that are not stored
    are skipped, and so is history reachable only through them."""
    limit = max(1, min(limit, BACKFILL_MAX))
    heap: list[tuple[int, str]] = []
    seen: set[str] = set()
    pdus: dict[str, Mapping[str, Any]] = {}

    def push(event_id: str) -> None:
        if event_id in seen:
            return
        seen.add(event_id)
        pdu = lookup(event_id)
        if pdu is not None:
            pdus[event_id] = pdu
            heapq.heappush(heap, (-_depth(pdu), event_id))

    for event_id in starts:
        push(event_id)
    result: list[str] = []
    while heap and len(result) < limit:
        _, event_id = heapq.heappop(heap)
        result.append(event_id)
        for prev in event_refs(pdus[event_id].get("prev_events")):
            push(prev)
    return result


def missing_event_ids(
    earliest: Sequence[str],
    latest: Sequence[str],
    limit: int,
    min_depth: int,
    lookup: Lookup,
) -> list[str]:
    """``POST /get_missing_events`` (SSAPI §Backfilling and retrieving missing events): the
    stored ancestors of the stored ``latest`` events through ``prev_events``, walked breadth
    first as Synapse does, never entering an ``earliest`` event nor one below ``min_depth``;
    the ``latest`` events themselves are not included. At most ``limit`` (clamped to
    1..:data:`MISSING_EVENTS_MAX`) — those nearest ``latest`` —, oldest first (by ``depth``)."""
    limit = max(1, min(limit, MISSING_EVENTS_MAX))
    seen = set(earliest)
    front = [e for e in dict.fromkeys(latest) if e not in seen and lookup(e) is not None]
    seen.update(front)
    found: list[tuple[str, int]] = []
    while front and len(found) < limit:
        new_front: list[str] = []
        for event_id in front:
            pdu = lookup(event_id)
            for prev in event_refs(pdu.get("prev_events") if pdu is not None else None):
                if prev in seen or len(found) >= limit:
                    continue
                seen.add(prev)
                prev_pdu = lookup(prev)
                if prev_pdu is None or _depth(prev_pdu) < min_depth:
                    continue
                found.append((prev, _depth(prev_pdu)))
                new_front.append(prev)
        front = new_front
    found.reverse()  # built from latest backwards: the oldest last
    return [event_id for event_id, _ in sorted(found, key=lambda item: item[1])]


def auth_chain_ids(events: Iterable[str], lookup: Lookup) -> tuple[list[str], set[str]]:
    """The auth chain of ``events``: every event reachable through ``auth_events`` (the
    given events themselves only when another one reaches them, as Synapse's
    ``get_auth_chain_ids``), and the IDs named on the way that are not stored (an empty set:
    the chain is complete). The chain is in the order it was reached."""
    chain: dict[str, None] = {}
    missing: set[str] = set()
    todo = list(events)
    visited: set[str] = set()
    while todo:
        event_id = todo.pop()
        if event_id in visited:
            continue
        visited.add(event_id)
        pdu = lookup(event_id)
        if pdu is None:
            missing.add(event_id)
            continue
        for auth_id in event_refs(pdu.get("auth_events")):
            chain.setdefault(auth_id)
            todo.append(auth_id)
    missing &= set(chain)
    return [e for e in chain if e not in missing], missing


def state_before(
    event_id: str,
    pdu: Mapping[str, Any],
    *,
    later: Sequence[Mapping[str, Any] | None] | None,
    later_complete: bool,
    current: Mapping[tuple[str, str], str],
    lookup: Lookup,
) -> StateMap | None:
    """The room's state *before* ``event_id`` (what ``/state`` and ``/state_ids`` answer,
    as Synapse's ``get_state_ids_for_pdu``), when the stored current state tells it exactly;
    else ``None``.

    The store keeps only the current state, so it is exact only when nothing after the event
    could have changed it: the event is on the room's stream (``later`` is not ``None``) and
    every stream row after it (``later``: the PDUs in order, ``None`` for a gap row; all of
    them: ``later_complete``) is a non-state event. Then the state before a non-state event
    is the current state. For a state event, which must hold its (type, state key) in
    ``current``, the previous holder is needed: ``m.room.create`` had none; for
    :data:`PRIOR_STATE_IN_AUTH_EVENTS` it is the event's own auth event of the same (type,
    state key), or none when there is no such auth event (each auth event must be stored to
    tell); other types cannot be told.

    Args:
        event_id / pdu: the event, a stored event of the room.
        later: the stream rows after it, oldest first; ``None``: it is not on the stream.
        later_complete: ``later`` holds every row after the event (not a capped read).
        current: the room's current state, (type, state key) → event ID.
        lookup: the stored events of the room.
    """
    if later is None or not later_complete:
        return None
    if any(row is None or _state_key(row) is not None for row in later):
        return None
    state = dict(current)
    key = _state_key(pdu)
    if key is None:
        return state
    if current.get(key) != event_id:
        return None
    if key == ("m.room.create", ""):
        return {}
    if key[0] not in PRIOR_STATE_IN_AUTH_EVENTS:
        return None
    prior: str | None = None
    for auth_id in event_refs(pdu.get("auth_events")):
        auth_pdu = lookup(auth_id)
        if auth_pdu is None:
            return None
        if _state_key(auth_pdu) == key:
            prior = auth_id
    if prior is None:
        del state[key]
    else:
        state[key] = prior
    return state

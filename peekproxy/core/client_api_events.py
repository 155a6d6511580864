"""Events read through the fronted homeserver's client-server API, in the shapes the store
keeps (pure).

peekproxy follows a world_readable room hosted on the homeserver it fronts through that
homeserver's client API (``services/client_api_follower.py``). The homeserver is trusted:
its events are not checked like federation PDUs, only brought into the stored shape.

* Timeline events are read with ``raw`` (``GET /rooms/{roomId}/messages?raw``,
  ``GET /events?room_id=…&raw``): Synapse then answers with full PDUs plus ``event_id`` and
  ``unsigned`` (synapse-harness.md §5.1). :func:`pdu_from_raw` strips those two, and the
  ``room_id`` a room version 12 ``m.room.create`` event must not have.
* The state (``GET /rooms/{roomId}/state``) exists only in the client format (client-server
  API §Room Events): :func:`stored_from_client` keeps what a client event carries
  (``type``, ``state_key``, ``content``, ``sender``, ``origin_server_ts``, ``redacts``),
  which is all :func:`peekproxy.core.sync.client_event` shows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from peekproxy.core.peekability import ending_reason
from peekproxy.core.room_versions import UnknownRoomVersion, room_version

__all__ = [
    "ClientApiState",
    "pdu_from_raw",
    "room_state",
    "stored_from_client",
]

#: The fields of a client-format event kept when it is stored.
_CLIENT_FIELDS = ("type", "state_key", "content", "sender", "origin_server_ts", "redacts")


def pdu_from_raw(raw: object, room_id: str) -> tuple[str, dict[str, Any]] | None:
    """(event ID, PDU) of one ``raw`` event of ``room_id`` from the homeserver's client
    API, or ``None`` for anything else in such a chunk (presence, typing, receipts: no
    ``event_id`` or ``prev_events``; another room's event).

    The PDU is the event without ``event_id`` and ``unsigned``; an ``m.room.create`` event
    whose ``room_id`` is not a field of its room version's PDUs (version 12: the room ID is
    the create event's hash) loses it too (synapse-harness.md §5.1)."""
    if not isinstance(raw, Mapping):
        return None
    event_id = raw.get("event_id")
    if (
        not isinstance(event_id, str)
        or raw.get("room_id", room_id) != room_id
        or not isinstance(raw.get("prev_events"), list)
    ):
        return None
    pdu = {k: v for k, v in raw.items() if k not in ("event_id", "unsigned")}
    if pdu.get("type") == "m.room.create" and _room_id_is_hash(pdu):
        pdu.pop("room_id", None)
    return event_id, pdu


def _room_id_is_hash(create: Mapping[str, Any]) -> bool:
    content = create.get("content")
    version = content.get("room_version", "1") if isinstance(content, Mapping) else "1"
    try:
        return room_version(str(version)).format.room_id_is_create_event_hash
    except UnknownRoomVersion:
        return False


def stored_from_client(event: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(event ID, stored event) of a client-format event, or ``None`` when it has no
    string ``event_id`` and ``type``. The stored event keeps only what a client event
    shows (see the module docstring); it has no ``depth`` nor ``prev_events``, so it never
    goes on a room's stream by itself."""
    event_id, kind = event.get("event_id"), event.get("type")
    if not isinstance(event_id, str) or not isinstance(kind, str):
        return None
    return event_id, {k: event[k] for k in _CLIENT_FIELDS if k in event}


@dataclass(frozen=True)
class ClientApiState:
    """A room's state from ``GET /rooms/{roomId}/state`` (client format), stored-shaped.

    ``events``: event ID → stored event; ``state``: (type, state key) → event ID;
    ``room_version``: from ``m.room.create`` (``"1"`` when its content names none);
    ``unpeekable``: why the room may not be peeked (decision 10: not world_readable, or
    encrypted), else ``None``.
    """

    events: dict[str, dict[str, Any]]
    state: dict[tuple[str, str], str]
    room_version: str | None
    unpeekable: str | None


def room_state(client_events: Iterable[object]) -> ClientApiState:
    """The room state of a ``/state`` answer (a list of client events; anything else in
    it is skipped). ``room_version`` is ``None`` when there is no ``m.room.create`` event;
    ``unpeekable`` says so too when no ``m.room.history_visibility`` event makes the room
    world_readable (the default visibility, ``shared``, is not)."""
    events: dict[str, dict[str, Any]] = {}
    state: dict[tuple[str, str], str] = {}
    for raw in client_events:
        if not isinstance(raw, Mapping) or not isinstance(raw.get("state_key"), str):
            continue
        stored = stored_from_client(raw)
        if stored is None:
            continue
        event_id, event = stored
        events[event_id] = event
        state[(event["type"], event["state_key"])] = event_id
    version: str | None = None
    create = events.get(state.get(("m.room.create", ""), ""))
    if create is not None:
        content = create.get("content")
        found = content.get("room_version", "1") if isinstance(content, Mapping) else "1"
        version = found if isinstance(found, str) else None
    unpeekable = ending_reason(events[e] for e in state.values())
    if ("m.room.history_visibility", "") not in state:
        unpeekable = unpeekable or "history_visibility is 'shared' (not world_readable)"
    if version is None:
        unpeekable = unpeekable or "the room's state has no m.room.create event"
    return ClientApiState(events, state, version, unpeekable)

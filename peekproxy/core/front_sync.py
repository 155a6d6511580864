"""The sync front's pure rules: a homeserver's ``/sync`` answer and a device's peek section,
merged (MSC2753 ``rooms.peek`` inside the client-server API's ``GET /sync``).

Pure: JSON values in, JSON values or decisions out. The service
(:mod:`peekproxy.services.front_sync`) forwards the client's ``/sync`` to the homeserver,
waits for the device's peek news in parallel and asks these functions what to send:

* :func:`filter_timeline_limit`: the ``room.timeline.limit`` of the client's filter (the
  client-server API §Filtering), clamped to 1–100, default 10: the peek section follows it;
* :func:`is_inline_filter`: whether a ``filter`` parameter is inline JSON or a filter ID;
* :func:`joined_rooms`: the rooms of the homeserver's ``rooms.join``;
* :func:`has_news`: whether a peek section holds anything for the client;
* :func:`merge_sync`: the homeserver's answer with ``rooms.<section>`` and ``rooms.leave``
  merged in, everything else as the homeserver sent it;
* :func:`without_wait`: the client's query with ``timeout=0`` (peek news came first);
* :func:`encode_answer`: a merged answer as compact UTF-8 JSON, as Synapse writes it;
* :func:`json_object`: a JSON object from the homeserver or a client, or ``None`` for
  anything else (not JSON, nested too deeply to parse, not an object);
* :func:`sync_answer`: a homeserver ``/sync`` answer's object and ``next_batch``, or ``None``
  when it is not a sync response (then it goes to the client as it came);
* :func:`is_token_shape`: whether an access token can be sent in an HTTP header at all;
* :func:`token_hash`: the sha256 of an access token or a ``next_batch`` token, the only form
  in which peekproxy keeps or logs them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

__all__ = [
    "DEFAULT_TIMELINE_LIMIT",
    "MAX_TIMELINE_LIMIT",
    "encode_answer",
    "filter_timeline_limit",
    "has_news",
    "is_inline_filter",
    "is_token_shape",
    "joined_rooms",
    "json_object",
    "merge_sync",
    "sync_answer",
    "token_hash",
    "without_wait",
]

#: The timeline limit of a sync whose filter says none (Synapse's default too).
DEFAULT_TIMELINE_LIMIT = 10
#: The most events a peeked room's timeline holds per sync, whatever the filter says.
MAX_TIMELINE_LIMIT = 100


def token_hash(token: str) -> str:
    """The lower-case hex sha256 of ``token`` (UTF-8): how access tokens and homeserver
    ``next_batch`` tokens are keyed, stored and logged (never in clear)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def json_object(data: str | bytes) -> dict[str, Any] | None:
    """``data`` parsed as JSON when it is a JSON object; ``None`` when it is not JSON (or
    not UTF-8), is nested too deeply for the parser (``RecursionError``, e.g. 100,000
    ``[``), holds an integer of more than 4,300 digits, or is another JSON value."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def sync_answer(body: bytes) -> tuple[dict[str, Any], str] | None:
    """A homeserver's ``/sync`` answer (client-server API §Syncing) as (the JSON object, its
    ``next_batch``); ``None`` when it is not a sync response: not a JSON object
    (:func:`json_object`) or ``next_batch`` missing or not a string."""
    answer = json_object(body)
    next_batch = answer.get("next_batch") if answer is not None else None
    if answer is None or not isinstance(next_batch, str):
        return None
    return answer, next_batch


def is_token_shape(token: str) -> bool:
    """Whether ``token`` can be an access token: visible ASCII only (RFC 6750 §2.1's
    ``b64token`` is narrower still), so it can go in an ``Authorization`` header. Anything
    else (empty, non-ASCII, spaces, control characters) no homeserver has issued."""
    return bool(token) and token.isascii() and token.isprintable() and " " not in token


def is_inline_filter(filter_param: str) -> bool:
    """Whether a ``/sync`` ``filter`` parameter is an inline JSON filter (it starts with
    ``{``); else it is a filter ID made by ``POST /user/{userId}/filter``."""
    return filter_param.lstrip().startswith("{")


def filter_timeline_limit(filter_json: Any) -> int:
    """The ``room.timeline.limit`` of a filter definition (client-server API §Filtering,
    ``RoomEventFilter.limit``), clamped to 1–``MAX_TIMELINE_LIMIT``.

    Lenient: the homeserver judges the client's filter; here anything that is not a
    positive integer where the limit belongs (or a filter that is not an object) gives
    ``DEFAULT_TIMELINE_LIMIT``."""
    room = filter_json.get("room") if isinstance(filter_json, Mapping) else None
    timeline = room.get("timeline") if isinstance(room, Mapping) else None
    limit = timeline.get("limit") if isinstance(timeline, Mapping) else None
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        return DEFAULT_TIMELINE_LIMIT
    return min(limit, MAX_TIMELINE_LIMIT)


def joined_rooms(homeserver_sync: Mapping[str, Any]) -> set[str]:
    """The room IDs of a sync answer's ``rooms.join`` (empty when absent or malformed)."""
    rooms = homeserver_sync.get("rooms")
    join = rooms.get("join") if isinstance(rooms, Mapping) else None
    return (
        {room_id for room_id in join if isinstance(room_id, str)}
        if isinstance(join, Mapping)
        else set()
    )


def _section(peek_sync: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    rooms = peek_sync.get("rooms")
    part = rooms.get(name) if isinstance(rooms, Mapping) else None
    return part if isinstance(part, Mapping) else {}


def has_news(peek_sync: Mapping[str, Any], section: str, drop: Collection[str] = ()) -> bool:
    """Whether a device's peek sync (``{next_batch, rooms: {section, leave}}``,
    :func:`peekproxy.core.sync.build_sync`) shows any room other than those in ``drop``."""
    return any(
        room_id not in drop for name in (section, "leave") for room_id in _section(peek_sync, name)
    )


def merge_sync(
    homeserver_sync: Mapping[str, Any],
    peek_sync: Mapping[str, Any],
    *,
    section: str,
    drop: Collection[str] = (),
) -> dict[str, Any]:
    """The homeserver's sync answer with the device's peek rooms merged in (MSC2753).

    ``rooms.<section>`` becomes the peek sync's section without the rooms in ``drop`` (rooms
    the user has joined: the homeserver's ``rooms.join`` shows them); the peek sync's
    ``rooms.leave`` entries are added to the homeserver's, whose own entry wins for a room
    in both. Everything else (``next_batch``, ``rooms.join``/``invite``/``knock``,
    account data, to-device, device lists, presence) is the homeserver's. Neither input is
    modified (the peek sync is shared between devices); the parts taken from it are shared
    with the result, not copied.
    """
    merged = dict(homeserver_sync)
    rooms_in = homeserver_sync.get("rooms")
    rooms = dict(rooms_in) if isinstance(rooms_in, Mapping) else {}
    peeked = {r: v for r, v in _section(peek_sync, section).items() if r not in drop}
    rooms[section] = peeked
    left = _section(peek_sync, "leave")
    if left:
        leave_in = rooms.get("leave")
        leave = dict(leave_in) if isinstance(leave_in, Mapping) else {}
        for room_id, entry in left.items():
            if room_id not in drop:
                leave.setdefault(room_id, entry)
        rooms["leave"] = leave
    merged["rooms"] = rooms
    return merged


def without_wait(query: str) -> str:
    """A ``/sync`` query string (as the client sent it, without ``?``) with ``timeout=0``:
    the homeserver's answer at once, for the same ``since``. Every other parameter stays,
    in order; a missing ``timeout`` is added."""
    pairs = parse_qsl(query, keep_blank_values=True)
    kept = [(k, v) for k, v in pairs if k != "timeout"]
    return urlencode([*kept, ("timeout", "0")])


def encode_answer(answer: Mapping[str, Any]) -> bytes:
    """A merged sync answer as compact UTF-8 JSON, as Synapse writes it; ASCII with ``\\u``
    escapes when a string holds a lone surrogate (a ``\\ud800`` escape in the homeserver's
    JSON), which UTF-8 cannot carry."""
    try:
        return json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(answer, separators=(",", ":")).encode()


def drained_answer(since: str) -> dict[str, Any]:
    """The front ``/sync`` answer of a long-poll cut short by a shutdown (SIGTERM drain):
    nothing new, ``next_batch`` the client's own ``since`` (a homeserver token), so its
    next ``/sync``, to this daemon's successor or the homeserver, goes on from where it
    was and misses nothing. Synapse answers a long-poll with no news the same way (only
    ``next_batch``; every other key of the response is optional)."""
    return {"next_batch": since}

"""core/client_api_events.py: events read through the homeserver's client API, in the stored
shape; core/peekability.ending_reason."""

from __future__ import annotations

from typing import Any

from peekproxy.core.client_api_events import pdu_from_raw, room_state, stored_from_client
from peekproxy.core.peekability import ending_reason

ROOM = "!room:hs.test"


def raw(event_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "room_id": ROOM,
        "type": "m.room.message",
        "sender": "@a:hs.test",
        "content": {"body": event_id},
        "prev_events": ["$before"],
        "auth_events": [],
        "depth": 5,
        "hashes": {"sha256": "x"},
        "signatures": {},
        "origin_server_ts": 1,
        "unsigned": {"age": 3, "membership": "leave"},
    } | fields


def client(event_id: str, kind: str, content: dict[str, Any], key: str = "") -> dict[str, Any]:
    return {
        "event_id": event_id,
        "room_id": ROOM,
        "type": kind,
        "state_key": key,
        "sender": "@a:hs.test",
        "content": content,
        "origin_server_ts": 7,
        "age": 9,
        "user_id": "@a:hs.test",
        "unsigned": {"age": 9},
    }


def test_raw_events_lose_event_id_and_unsigned() -> None:
    found = pdu_from_raw(raw("$e"), ROOM)
    assert found is not None
    event_id, pdu = found
    assert event_id == "$e"
    assert "event_id" not in pdu and "unsigned" not in pdu
    assert pdu["room_id"] == ROOM and pdu["prev_events"] == ["$before"] and pdu["depth"] == 5


def test_what_is_not_an_event_of_the_room_is_skipped() -> None:
    presence = {"type": "m.presence", "content": {"presence": "online", "user_id": "@a:hs.test"}}
    assert pdu_from_raw(presence, ROOM) is None
    assert pdu_from_raw(raw("$other", room_id="!other:hs.test"), ROOM) is None
    client_format = raw("$c")
    del client_format["prev_events"]
    assert pdu_from_raw(client_format, ROOM) is None
    assert pdu_from_raw("nonsense", ROOM) is None


def test_a_v12_create_event_loses_the_room_id_it_must_not_have() -> None:
    create_v12 = raw("$create", type="m.room.create", state_key="", prev_events=[])
    create_v12["content"] = {"room_version": "12"}
    found = pdu_from_raw(create_v12, ROOM)
    assert found is not None and "room_id" not in found[1]
    create_v10 = create_v12 | {"content": {"room_version": "10"}}
    found = pdu_from_raw(create_v10, ROOM)
    assert found is not None and found[1]["room_id"] == ROOM


def test_client_events_keep_what_a_client_event_shows() -> None:
    found = stored_from_client(client("$n", "m.room.name", {"name": "N"}))
    assert found == (
        "$n",
        {
            "type": "m.room.name",
            "state_key": "",
            "content": {"name": "N"},
            "sender": "@a:hs.test",
            "origin_server_ts": 7,
        },
    )
    assert stored_from_client({"type": "m.room.name"}) is None


def test_room_state_of_a_world_readable_room() -> None:
    state = room_state(
        [
            client("$c", "m.room.create", {"room_version": "10"}),
            client("$h", "m.room.history_visibility", {"history_visibility": "world_readable"}),
            client("$m", "m.room.member", {"membership": "join"}, key="@a:hs.test"),
            "not an event",
            {"event_id": "$no-state-key", "type": "m.room.message", "content": {}},
        ]
    )
    assert state.room_version == "10"
    assert state.unpeekable is None
    assert state.state == {
        ("m.room.create", ""): "$c",
        ("m.room.history_visibility", ""): "$h",
        ("m.room.member", "@a:hs.test"): "$m",
    }
    assert set(state.events) == {"$c", "$h", "$m"}


def test_room_state_says_why_a_room_cannot_be_peeked() -> None:
    create = client("$c", "m.room.create", {})
    readable = client("$h", "m.room.history_visibility", {"history_visibility": "world_readable"})
    assert room_state([create, readable]).room_version == "1"  # no room_version: "1"
    shared = room_state([create])
    assert shared.unpeekable is not None and "world_readable" in shared.unpeekable
    joined = client("$h", "m.room.history_visibility", {"history_visibility": "joined"})
    assert "joined" in str(room_state([create, joined]).unpeekable)
    encrypted = client("$e", "m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"})
    assert room_state([create, readable, encrypted]).unpeekable == "encryption was enabled"
    no_create = room_state([readable])
    assert no_create.room_version is None and no_create.unpeekable is not None


def test_ending_reason_is_the_newest_events() -> None:
    message = {"type": "m.room.message", "content": {}}
    shared = {
        "type": "m.room.history_visibility",
        "state_key": "",
        "content": {"history_visibility": "shared"},
    }
    encryption = {"type": "m.room.encryption", "state_key": "", "content": {}}
    assert ending_reason([message]) is None
    assert ending_reason([]) is None
    assert ending_reason([shared, message]) == "history_visibility changed to 'shared'"
    assert ending_reason([shared, encryption, message]) == "encryption was enabled"

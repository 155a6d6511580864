"""The pure /sync builder for peeked rooms (protocol.md §2.5, decisions 7–10; scenarios 1–3,
6, 10, 12, 14, 16, 18; federation.md §7)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from peekproxy.core.sync import (
    SYNC_TOKEN_PREFIX,
    DevicePeek,
    InvalidToken,
    RoomView,
    StreamItem,
    build_sync,
    client_event,
    decode_token,
    encode_token,
)

NOW = 1_700_000_100_000
TS = 1_700_000_000_000
ALICE = "@alice:r.test"


@dataclass
class Stream:
    """A global stream position counter shared by the rooms of a test, as ``room_stream``."""

    pos: int = 0

    def next(self) -> int:
        self.pos += 1
        return self.pos


@dataclass
class Room:
    """A hand-built room: its stream, its PDUs and its current state."""

    stream: Stream
    room_id: str = "!r:r.test"
    room_version: str = "10"
    items: list[StreamItem] = field(default_factory=list)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    state_ids: dict[tuple[str, str], str] = field(default_factory=dict)
    redacted: set[str] = field(default_factory=set)
    ephemeral: list[tuple[str, dict[str, Any], int]] = field(default_factory=list)

    def pdu(
        self, event_type: str, content: dict[str, Any], state_key: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        event_id = f"${event_type}-{len(self.events)}"
        pdu: dict[str, Any] = {
            "room_id": self.room_id,
            "sender": ALICE,
            "type": event_type,
            "content": content,
            "origin_server_ts": TS + len(self.events),
            "depth": len(self.events) + 1,
            "prev_events": [],
            "auth_events": [],
        }
        if state_key is not None:
            pdu["state_key"] = state_key
        self.events[event_id] = pdu
        return event_id, pdu

    def send(self, event_type: str, content: dict[str, Any], state_key: str | None = None) -> str:
        """Append an event to the stream (and to the state, for a state event)."""
        event_id, _ = self.pdu(event_type, content, state_key)
        self.items.append(StreamItem(self.stream.next(), "event", event_id))
        if state_key is not None:
            self.state_ids[(event_type, state_key)] = event_id
        return event_id

    def message(self, body: str) -> str:
        return self.send("m.room.message", {"msgtype": "m.text", "body": body})

    def gap(self) -> int:
        pos = self.stream.next()
        self.items.append(StreamItem(pos, "gap", None))
        return pos

    def edu(self, edu_type: str, content: dict[str, Any]) -> int:
        pos = self.stream.next()
        self.ephemeral.append((edu_type, content, pos))
        return pos

    def create(self) -> None:
        self.send("m.room.create", {"creator": ALICE, "room_version": self.room_version}, "")
        self.send("m.room.member", {"membership": "join"}, ALICE)
        self.send("m.room.history_visibility", {"history_visibility": "world_readable"}, "")

    def view(self, *, keep: int | None = None) -> RoomView:
        """The view the shell would read; ``keep`` trims ``recent`` to its newest items."""
        recent = self.items if keep is None else self.items[-keep:]
        return RoomView(
            room_id=self.room_id,
            room_version=self.room_version,
            recent=list(recent),
            has_earlier=len(recent) < len(self.items),
            state_ids=dict(self.state_ids),
            events=dict(self.events),
            redacted=set(self.redacted),
            ephemeral=list(self.ephemeral),
        )


def sync(
    rooms: list[Room],
    peeks: list[DevicePeek],
    *,
    since: int | None,
    upto: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    position = upto if upto is not None else rooms[0].stream.pos
    return build_sync(
        since=since,
        upto=position,
        peeks=peeks,
        rooms={room.room_id: room.view() for room in rooms},
        now_ms=NOW,
        **kwargs,
    )


def active(room: Room, changed_pos: int) -> DevicePeek:
    return DevicePeek(room.room_id, "active", changed_pos)


def ids(section: dict[str, Any]) -> list[str]:
    return [event["event_id"] for event in section["events"]]


def state_keys(entry: dict[str, Any]) -> set[tuple[str, str]]:
    return {(e["type"], e["state_key"]) for e in entry["state"]["events"]}


@pytest.fixture
def room() -> Room:
    return Room(Stream())


# -- tokens ------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", [0, 1, 42, 2**63 - 1])
def test_tokens_round_trip(position: int) -> None:
    token = encode_token(position)
    assert token == f"{SYNC_TOKEN_PREFIX}{position}"
    assert decode_token(token) == position


@pytest.mark.parametrize(
    "token",
    [
        "",
        "pp1_",
        "pp1_-1",
        "pp1_+1",
        "pp1_01",
        "pp1_1.5",
        "pp1_1e3",
        "pp1_ 1",
        " pp1_1",
        "pp1_1\n",
        "pp1_\u0661",  # ARABIC-INDIC DIGIT ONE: int() would accept it
        "pp2_1",
        "s72594_4483_1934",
        "1",
        f"pp1_{2**63}",
        "pp1_" + "9" * 40,
    ],
)
def test_junk_tokens_are_invalid(token: str) -> None:
    with pytest.raises(InvalidToken):
        decode_token(token)


def test_invalid_token_is_a_value_error_and_non_strings_are_refused() -> None:
    assert issubclass(InvalidToken, ValueError)
    with pytest.raises(InvalidToken):
        decode_token(5)  # type: ignore[arg-type]


def test_encode_token_refuses_negative_positions() -> None:
    with pytest.raises(ValueError):
        encode_token(-1)
    with pytest.raises(TypeError):
        encode_token(True)


def test_since_after_upto_is_an_invalid_token(room: Room) -> None:
    room.create()
    with pytest.raises(InvalidToken):
        sync([room], [active(room, 1)], since=room.stream.pos + 1)


# -- client_event ------------------------------------------------------------------------------


def test_client_event_shape() -> None:
    pdu: dict[str, Any] = {
        "room_id": "!r:r.test",
        "sender": ALICE,
        "type": "m.room.message",
        "content": {"body": "hi", "msgtype": "m.text"},
        "origin_server_ts": TS,
        "depth": 5,
        "prev_events": ["$a"],
        "auth_events": [],
        "hashes": {"sha256": "x"},
        "signatures": {"r.test": {"ed25519:a": "sig"}},
        "unsigned": {"age_ts": 1},
    }
    event = client_event(pdu, "$m", room_id="!r:r.test", now_ms=TS + 2500)
    assert event == {
        "event_id": "$m",
        "room_id": "!r:r.test",
        "sender": ALICE,
        "type": "m.room.message",
        "content": {"body": "hi", "msgtype": "m.text"},
        "origin_server_ts": TS,
        "unsigned": {"age": 2500},
    }
    without_room = client_event(pdu, "$m", room_id=None, now_ms=TS)
    assert "room_id" not in without_room
    assert "state_key" not in without_room
    assert without_room["unsigned"] == {"age": 0}
    without_room["content"]["body"] = "changed"
    assert pdu["content"]["body"] == "hi"


def test_client_event_state_key_and_redacts() -> None:
    state: dict[str, Any] = {
        "sender": ALICE,
        "type": "m.room.name",
        "state_key": "",
        "content": {"name": "n"},
    }
    state["origin_server_ts"] = TS
    assert client_event(state, "$n", room_id=None, now_ms=TS + 1)["state_key"] == ""

    v10: dict[str, Any] = {
        "sender": ALICE,
        "type": "m.room.redaction",
        "redacts": "$m",
        "content": {},
    }
    v10["origin_server_ts"] = TS
    assert client_event(v10, "$x", room_id=None, now_ms=TS)["redacts"] == "$m"

    v11: dict[str, Any] = {
        "sender": ALICE,
        "type": "m.room.redaction",
        "content": {"redacts": "$m"},
    }
    v11["origin_server_ts"] = TS
    event = client_event(v11, "$y", room_id=None, now_ms=TS)
    assert event["content"] == {"redacts": "$m"}
    assert "redacts" not in event


def test_client_event_age_is_never_negative() -> None:
    pdu = {"sender": ALICE, "type": "m.room.message", "content": {}, "origin_server_ts": TS}
    assert client_event(pdu, "$m", room_id=None, now_ms=TS - 10)["unsigned"] == {"age": 0}


# -- new peeks and initial syncs ---------------------------------------------------------------


def test_tiny_room_initial_sync_has_all_state_in_the_timeline(room: Room) -> None:
    """SyTest: timeline starts with m.room.create, state.events empty, last is the message."""
    room.create()
    message = room.message("something to peek")
    result = sync([room], [active(room, 1)], since=None)

    assert result["next_batch"] == encode_token(room.stream.pos)
    assert set(result["rooms"]) == {"peek", "leave"}
    assert result["rooms"]["leave"] == {}
    entry = result["rooms"]["peek"][room.room_id]
    assert set(entry) == {
        "timeline",
        "state",
        "ephemeral",
        "account_data",
        "unread_notifications",
        "summary",
    }
    timeline = entry["timeline"]
    assert timeline["events"][0]["type"] == "m.room.create"
    assert timeline["events"][-1]["event_id"] == message
    assert timeline["limited"] is False
    assert timeline["prev_batch"] == encode_token(0)
    assert entry["state"]["events"] == []
    assert entry["ephemeral"] == {"events": []}
    assert entry["account_data"] == {"events": []}
    assert all("room_id" not in e for e in timeline["events"])
    assert (
        timeline["events"][-1]["unsigned"]["age"] == NOW - room.events[message]["origin_server_ts"]
    )


def test_initial_sync_limits_the_timeline_and_sends_the_rest_as_state(room: Room) -> None:
    room.create()
    name = room.send("m.room.name", {"name": "Peekable"}, "")
    messages = [room.message(f"m{i}") for i in range(12)]
    result = sync([room], [active(room, 2)], since=None, timeline_limit=10)
    entry = result["rooms"]["peek"][room.room_id]

    assert ids(entry["timeline"]) == messages[-10:]
    assert entry["timeline"]["limited"] is True
    first_pos = next(i.pos for i in room.items if i.event_id == messages[2])
    assert entry["timeline"]["prev_batch"] == encode_token(first_pos - 1)
    # current state is covered by state ∪ timeline; state events are sorted and room-less
    assert [(e["type"], e["state_key"]) for e in entry["state"]["events"]] == [
        ("m.room.create", ""),
        ("m.room.history_visibility", ""),
        ("m.room.member", ALICE),
        ("m.room.name", ""),
    ]
    assert name in ids(entry["state"])
    assert all("room_id" not in e for e in entry["state"]["events"])


def test_initial_sync_is_limited_when_history_is_truncated(room: Room) -> None:
    room.create()
    room.message("one")
    upto = room.stream.pos
    view = room.view(keep=2)  # the shell read only the newest items: earlier ones exist
    result = build_sync(
        since=None, upto=upto, peeks=[active(room, 1)], rooms={room.room_id: view}, now_ms=NOW
    )
    entry = result["rooms"]["peek"][room.room_id]
    assert len(entry["timeline"]["events"]) == 2
    assert entry["timeline"]["limited"] is True
    assert state_keys(entry) == {("m.room.create", ""), ("m.room.member", ALICE)}


def test_initial_sync_after_a_snapshot_starts_after_the_gap(room: Room) -> None:
    """A peek response is stored as state + gap + latest event: the timeline must not run
    across the gap, and the state covers the rest."""
    for key, eid in [
        (("m.room.create", ""), room.pdu("m.room.create", {"creator": ALICE}, "")[0]),
        (("m.room.member", ALICE), room.pdu("m.room.member", {"membership": "join"}, ALICE)[0]),
    ]:
        room.state_ids[key] = eid
    room.gap()
    latest = room.message("latest")
    result = sync([room], [active(room, room.stream.pos)], since=None)
    entry = result["rooms"]["peek"][room.room_id]
    assert ids(entry["timeline"]) == [latest]
    assert entry["timeline"]["limited"] is True
    assert state_keys(entry) == {("m.room.create", ""), ("m.room.member", ALICE)}


def test_events_after_upto_are_not_shown(room: Room) -> None:
    room.create()
    upto = room.stream.pos
    later = room.message("later")
    result = sync([room], [active(room, 1)], since=None, upto=upto)
    entry = result["rooms"]["peek"][room.room_id]
    assert later not in ids(entry["timeline"])
    assert result["next_batch"] == encode_token(upto)


# -- incremental syncs ------------------------------------------------------------------------


def test_no_change_sync_omits_the_room(room: Room) -> None:
    room.create()
    room.message("something to peek")
    first = sync([room], [active(room, 1)], since=None)
    since = decode_token(first["next_batch"])
    again = sync([room], [active(room, 1)], since=since)
    assert again == {"next_batch": encode_token(since), "rooms": {"peek": {}, "leave": {}}}


def test_live_events_only(room: Room) -> None:
    room.create()
    since = room.stream.pos
    first = room.message("something else to peek")
    second = room.message("and more")
    entry = sync([room], [active(room, 1)], since=since)["rooms"]["peek"][room.room_id]
    assert ids(entry["timeline"]) == [first, second]
    assert entry["timeline"]["limited"] is False
    assert entry["timeline"]["prev_batch"] == encode_token(since)
    assert entry["state"]["events"] == []


@pytest.mark.parametrize(("sent", "limit"), [(2, 3), (6, 10), (9, 10), (10, 10), (11, 10)])
def test_live_timeline_holds_up_to_the_limit(room: Room, sent: int, limit: int) -> None:
    # Regression: fewer events than the limit (but more than half of it) used to be cut to
    # ``2 * sent - limit`` and marked limited.
    room.create()
    since = room.stream.pos
    sent_ids = [room.message(f"m{i}") for i in range(sent)]
    entry = sync([room], [active(room, 1)], since=since, timeline_limit=limit)["rooms"]["peek"]
    timeline = entry[room.room_id]["timeline"]
    assert ids(timeline) == sent_ids[-limit:]
    assert timeline["limited"] is (sent > limit)


def test_live_state_event_is_in_the_timeline_not_the_state(room: Room) -> None:
    room.create()
    since = room.stream.pos
    topic = room.send("m.room.topic", {"topic": "t"}, "")
    entry = sync([room], [active(room, 1)], since=since)["rooms"]["peek"][room.room_id]
    assert ids(entry["timeline"]) == [topic]
    assert entry["timeline"]["events"][0]["state_key"] == ""
    assert entry["state"]["events"] == []


def test_gap_makes_the_sync_limited_with_current_state(room: Room) -> None:
    """A lapse (decision 4) or an idle restore stores a gap and replaces the state: the
    timeline starts after the gap and the state brings the client up to date."""
    room.create()
    room.send("m.room.name", {"name": "old"}, "")
    since = room.stream.pos
    before_gap = room.message("before the gap")
    room.gap()
    new_name, _ = room.pdu("m.room.name", {"name": "changed while away"}, "")
    room.state_ids[("m.room.name", "")] = new_name  # from the new peek's state, not the stream
    after = room.message("after the gap")

    entry = sync([room], [active(room, 1)], since=since)["rooms"]["peek"][room.room_id]
    assert ids(entry["timeline"]) == [after]
    assert before_gap not in ids(entry["timeline"])
    assert entry["timeline"]["limited"] is True
    assert new_name in ids(entry["state"])
    assert state_keys(entry) == {
        ("m.room.create", ""),
        ("m.room.member", ALICE),
        ("m.room.history_visibility", ""),
        ("m.room.name", ""),
    }
    pos = next(i.pos for i in room.items if i.event_id == after)
    assert entry["timeline"]["prev_batch"] == encode_token(pos - 1)


def test_gap_alone_still_shows_the_room(room: Room) -> None:
    """A new peek whose latest event was already known stores only a gap."""
    room.create()
    since = room.stream.pos
    room.gap()
    entry = sync([room], [active(room, 1)], since=since)["rooms"]["peek"][room.room_id]
    assert entry["timeline"] == {
        "events": [],
        "limited": True,
        "prev_batch": encode_token(room.stream.pos),
    }
    assert len(entry["state"]["events"]) == 3


def test_more_events_than_the_limit_is_limited(room: Room) -> None:
    room.create()
    since = room.stream.pos
    messages = [room.message(f"m{i}") for i in range(5)]
    peek = [active(room, 1)]
    entry = sync([room], peek, since=since, timeline_limit=3)["rooms"]["peek"][room.room_id]
    assert ids(entry["timeline"]) == messages[-3:]
    assert entry["timeline"]["limited"] is True
    assert len(entry["state"]["events"]) == 3

    exact = sync([room], peek, since=since, timeline_limit=5)["rooms"]["peek"][room.room_id]
    assert ids(exact["timeline"]) == messages
    assert exact["timeline"]["limited"] is False
    assert exact["state"]["events"] == []


def test_limited_state_leaves_out_state_events_in_the_timeline(room: Room) -> None:
    room.create()
    since = room.stream.pos
    for i in range(4):
        room.message(f"m{i}")
    topic = room.send("m.room.topic", {"topic": "t"}, "")
    entry = sync([room], [active(room, 1)], since=since, timeline_limit=2)["rooms"]["peek"]
    events = entry[room.room_id]
    assert topic in ids(events["timeline"])
    assert topic not in ids(events["state"])


def test_timeline_limit_zero(room: Room) -> None:
    room.create()
    since = room.stream.pos
    room.message("m")
    entry = sync([room], [active(room, 1)], since=since, timeline_limit=0)["rooms"]["peek"]
    timeline = entry[room.room_id]["timeline"]
    assert timeline["events"] == []
    assert timeline["limited"] is True


def test_full_state(room: Room) -> None:
    """Scenario 16: full_state shows the room with its full state even without news; the
    timeline stays incremental."""
    room.create()
    since = room.stream.pos
    peek = [active(room, 1)]
    quiet = sync([room], peek, since=since, full_state=True)["rooms"]["peek"][room.room_id]
    assert quiet["timeline"] == {
        "events": [],
        "limited": False,
        "prev_batch": encode_token(room.stream.pos),
    }
    assert len(quiet["state"]["events"]) == 3

    topic = room.send("m.room.topic", {"topic": "t"}, "")
    message = room.message("m")
    busy = sync([room], peek, since=since, full_state=True)["rooms"]["peek"][room.room_id]
    assert ids(busy["timeline"]) == [topic, message]
    assert busy["timeline"]["limited"] is False
    assert len(busy["state"]["events"]) == 3
    assert topic not in ids(busy["state"])


# -- lifecycle --------------------------------------------------------------------------------


def test_unpeek_puts_the_room_in_leave_with_the_events_since_the_last_sync(room: Room) -> None:
    room.create()
    since = room.stream.pos
    message = room.message("before unpeek")
    ended = room.stream.next()
    room.message("after unpeek: never delivered")
    result = sync([room], [DevicePeek(room.room_id, "ended", ended)], since=since)
    assert result["rooms"]["peek"] == {}
    assert result["rooms"]["leave"] == {
        room.room_id: {
            "timeline": {
                "events": [client_event(room.events[message], message, room_id=None, now_ms=NOW)],
                "limited": False,
                "prev_batch": encode_token(since),
            },
            "state": {"events": []},
        }
    }
    # the next sync does not show it again
    later = sync([room], [DevicePeek(room.room_id, "ended", ended)], since=room.stream.pos)
    assert later["rooms"] == {"peek": {}, "leave": {}}


def test_unpeek_without_events_is_an_empty_leave(room: Room) -> None:
    room.create()
    since = room.stream.pos
    ended = room.stream.next()
    result = sync([room], [DevicePeek(room.room_id, "ended", ended)], since=since)
    assert result["rooms"]["leave"] == {room.room_id: {}}
    # without a view of the room the entry is still there
    bare = build_sync(
        since=since,
        upto=ended,
        peeks=[DevicePeek(room.room_id, "ended", ended)],
        rooms={},
        now_ms=NOW,
    )
    assert bare["rooms"]["leave"] == {room.room_id: {}}


def test_history_visibility_change_ends_the_peek_with_the_event(room: Room) -> None:
    """Scenario 14: the leave entry includes the visibility event."""
    room.create()
    since = room.stream.pos
    hv = room.send("m.room.history_visibility", {"history_visibility": "shared"}, "")
    ended = room.stream.next()
    result = sync([room], [DevicePeek(room.room_id, "ended", ended)], since=since)
    assert ids(result["rooms"]["leave"][room.room_id]["timeline"]) == [hv]


def test_leave_with_many_events_is_limited(room: Room) -> None:
    room.create()
    since = room.stream.pos
    messages = [room.message(f"m{i}") for i in range(4)]
    ended = room.stream.next()
    peek = [DevicePeek(room.room_id, "ended", ended)]
    leave = sync([room], peek, since=since, timeline_limit=2)["rooms"]["leave"][room.room_id]
    assert ids(leave["timeline"]) == messages[-2:]
    assert leave["timeline"]["limited"] is True


def test_ended_peeks_are_not_shown_on_initial_sync_or_when_old(room: Room) -> None:
    room.create()
    ended = room.stream.next()
    room.message("later")
    peek = [DevicePeek(room.room_id, "ended", ended)]
    assert sync([room], peek, since=None)["rooms"] == {"peek": {}, "leave": {}}
    assert sync([room], peek, since=ended)["rooms"] == {"peek": {}, "leave": {}}


def test_peek_unpeek_peek_sends_full_state_again(room: Room) -> None:
    """Scenario 12: the re-peek moves changed_pos past the client's token."""
    room.create()
    room.message("seen")
    since = room.stream.pos
    room.stream.next()  # unpeek
    repeek = room.stream.next()
    result = sync([room], [active(room, repeek)], since=since)
    entry = result["rooms"]["peek"][room.room_id]
    assert result["rooms"]["leave"] == {}
    assert entry["timeline"]["events"][0]["type"] == "m.room.create"
    assert entry["timeline"]["limited"] is False


def test_idle_restore_is_a_new_peek_with_current_state(room: Room) -> None:
    """Scenario 18 / decision 9: dormant, then restored with a fresh snapshot."""
    room.create()
    room.send("m.room.name", {"name": "old"}, "")
    for i in range(3):
        room.message(f"seen {i}")
    since = room.stream.pos
    dormant = DevicePeek(room.room_id, "dormant", room.stream.next())
    room.message("while dormant")
    assert sync([room], [dormant], since=since)["rooms"] == {"peek": {}, "leave": {}}

    room.gap()
    new_name, _ = room.pdu("m.room.name", {"name": "new"}, "")
    room.state_ids[("m.room.name", "")] = new_name
    latest = room.message("latest")
    restored = active(room, room.stream.next())
    entry = sync([room], [restored], since=since)["rooms"]["peek"][room.room_id]
    assert ids(entry["timeline"]) == [latest]
    assert entry["timeline"]["limited"] is True
    assert decode_token(entry["timeline"]["prev_batch"]) < room.items[-1].pos
    assert new_name in ids(entry["state"])


def test_dormant_peeks_are_omitted(room: Room) -> None:
    room.create()
    since = room.stream.pos
    room.message("news")
    dormant = [DevicePeek(room.room_id, "dormant", 1)]
    assert sync([room], dormant, since=since)["rooms"] == {"peek": {}, "leave": {}}
    assert sync([room], dormant, since=None)["rooms"] == {"peek": {}, "leave": {}}


def test_section_name(room: Room) -> None:
    room.create()
    result = sync([room], [active(room, 1)], since=None, section="peeking")
    assert set(result["rooms"]) == {"peeking", "leave"}
    assert room.room_id in result["rooms"]["peeking"]
    with pytest.raises(ValueError):
        sync([room], [active(room, 1)], since=None, section="leave")


def test_only_the_given_peeks_rooms_appear() -> None:
    """Scenario 6: another device's rooms are not this device's business."""
    stream = Stream()
    mine = Room(stream, room_id="!mine:r.test")
    other = Room(stream, room_id="!other:r.test")
    mine.create()
    other.create()
    since = stream.pos
    mine.message("m")
    other.message("o")
    result = sync([mine, other], [active(mine, 1)], since=since)
    assert list(result["rooms"]["peek"]) == [mine.room_id]
    assert sync([mine, other], [], since=since)["rooms"] == {"peek": {}, "leave": {}}


def test_rooms_are_sorted_and_missing_views_skipped() -> None:
    stream = Stream()
    rooms = [Room(stream, room_id=f"!{name}:r.test") for name in ("c", "a", "b")]
    for r in rooms:
        r.create()
    peeks = [active(r, 1) for r in rooms] + [DevicePeek("!gone:r.test", "active", 1)]
    result = sync(rooms, peeks, since=None)
    assert list(result["rooms"]["peek"]) == ["!a:r.test", "!b:r.test", "!c:r.test"]


def test_a_repeated_room_uses_the_latest_peek_change(room: Room) -> None:
    room.create()
    since = room.stream.pos
    ended = room.stream.next()
    peeks = [active(room, 1), DevicePeek(room.room_id, "ended", ended)]
    assert sync([room], peeks, since=since)["rooms"]["leave"] == {room.room_id: {}}


# -- content ----------------------------------------------------------------------------------


def test_redacted_events_show_redacted_content(room: Room) -> None:
    room.create()
    since = room.stream.pos
    message = room.message("secret")
    member = room.send("m.room.member", {"membership": "join", "displayname": "x"}, "@b:r.test")
    room.redacted.update({message, member})
    entry = sync([room], [active(room, 1)], since=since)["rooms"]["peek"][room.room_id]
    events = entry["timeline"]["events"]
    assert events[0]["content"] == {}
    assert events[1]["content"] == {"membership": "join"}
    assert events[1]["state_key"] == "@b:r.test"


def test_ephemeral_typing_and_receipts(room: Room) -> None:
    room.create()
    message = room.message("m")
    room.edu("m.typing", {"room_id": room.room_id, "user_id": ALICE, "typing": True})
    room.edu(
        "m.receipt",
        {"m.read": {ALICE: {"event_ids": [message], "data": {"ts": TS}}}},
    )
    peek = [active(room, 1)]
    entry = sync([room], peek, since=None)["rooms"]["peek"][room.room_id]
    assert entry["ephemeral"]["events"] == [
        {"type": "m.typing", "content": {"user_ids": [ALICE]}},
        {"type": "m.receipt", "content": {message: {"m.read": {ALICE: {"ts": TS}}}}},
    ]

    since = room.stream.pos
    assert sync([room], peek, since=since)["rooms"]["peek"] == {}

    room.edu("m.typing", {"room_id": room.room_id, "user_id": ALICE, "typing": False})
    live = sync([room], peek, since=since)["rooms"]["peek"][room.room_id]
    upto = encode_token(room.stream.pos)
    assert live["timeline"] == {"events": [], "limited": False, "prev_batch": upto}
    assert live["ephemeral"]["events"] == [{"type": "m.typing", "content": {"user_ids": []}}]


def test_later_receipts_replace_earlier_ones_of_the_same_user(room: Room) -> None:
    room.create()
    first = room.message("1")
    second = room.message("2")
    room.edu("m.receipt", {"m.read": {ALICE: {"event_ids": [first], "data": {"ts": 1}}}})
    room.edu("m.receipt", {"m.read": {ALICE: {"event_ids": [second], "data": {"ts": 2}}}})
    entry = sync([room], [active(room, 1)], since=None)["rooms"]["peek"][room.room_id]
    assert entry["ephemeral"]["events"] == [
        {"type": "m.receipt", "content": {second: {"m.read": {ALICE: {"ts": 2}}}}}
    ]


def test_output_is_deterministic(room: Room) -> None:
    room.create()
    for i in range(3):
        room.message(f"m{i}")
    view = room.view()
    shuffled = RoomView(
        room_id=view.room_id,
        room_version=view.room_version,
        recent=list(reversed(view.recent)),
        has_earlier=False,
        state_ids=dict(reversed(list(view.state_ids.items()))),
        events=view.events,
        redacted=view.redacted,
    )
    args: dict[str, Any] = {"since": None, "upto": room.stream.pos, "now_ms": NOW}
    peeks = [active(room, 1)]
    assert build_sync(peeks=peeks, rooms={room.room_id: view}, **args) == build_sync(
        peeks=peeks, rooms={room.room_id: shuffled}, **args
    )

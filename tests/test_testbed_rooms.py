"""The testbed's pure room model (:mod:`peekproxy.testbed.rooms`).

Rooms are built and signed here with a throwaway key; the real Synapse fixtures (read at run
time from ``tests/fixtures/synapse-pdus``) are replayed to check that the model
makes the same events, ``auth_events`` and peek snapshot as Synapse does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from signedjson.key import generate_signing_key, get_verify_key

from peekproxy.core.events import compute_event_id, room_id_for_create
from peekproxy.core.pdu import check_pdu
from peekproxy.core.pdu_signatures import KeyLookup, VerifyKeyInfo, key_table
from peekproxy.testbed.rooms import (
    HISTORY_VISIBILITIES,
    JOIN_RULES,
    RoomError,
    TestbedRoom,
    UnknownEventError,
    canonical_aliases,
)

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "synapse-pdus"
VERSIONS = ["10", "11", "12"]
SERVER = "hs.test"
ALICE = f"@alice:{SERVER}"
BOB = f"@bob:{SERVER}"
KEY = generate_signing_key("tb1")
#: The error of an event the room version's authorization rules refuse
#: (:mod:`peekproxy.core.auth_rules`).
REFUSED = "the room's authorization rules refuse it: "
T0 = 1_700_000_000_000


def _keys(server_name: str = SERVER) -> KeyLookup:
    key_id = f"{KEY.alg}:{KEY.version}"
    return key_table({(server_name, key_id): VerifyKeyInfo(get_verify_key(KEY))})


def _fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text("utf-8"))
    return data


def _room(version: str, **kwargs: Any) -> TestbedRoom:
    options: dict[str, Any] = {
        "server_name": SERVER,
        "signing_key": KEY,
        "room_version": version,
        "creator": ALICE,
        "now_ms": T0,
    }
    options.update(kwargs)
    return TestbedRoom.create(**options)


def _message(room: TestbedRoom, sender: str, body: str, now_ms: int) -> str:
    event_id, _ = room.send(
        KEY,
        sender=sender,
        type="m.room.message",
        content={"msgtype": "m.text", "body": body},
        now_ms=now_ms,
    )
    return event_id


def _state(
    room: TestbedRoom, type: str, content: dict[str, Any], now_ms: int, sender: str = ALICE
) -> str:
    event_id, _ = room.send(
        KEY, sender=sender, type=type, state_key="", content=content, now_ms=now_ms
    )
    return event_id


def _busy_room(version: str) -> tuple[TestbedRoom, dict[str, str]]:
    """A room with alias, name and topic; bob joins; messages (one non-ASCII); the topic,
    power levels and history visibility change. Returns the room and named event IDs."""
    room = _room(version, alias=f"#busy:{SERVER}", name="Busy room", topic="Initial topic")
    ids = {"create": room.event_ids[0], "alice_join": room.event_ids[1]}
    ids["pl_initial"] = room.event_ids[2]
    ids["join_rules"] = room.event_ids[4]
    ids["bob_join"], _ = room.join(KEY, BOB, T0 + 1)
    ids["msg_plain"] = _message(room, ALICE, "hello", T0 + 2)
    ids["msg_unicode"] = _message(
        room, ALICE, 'Grüße — 日本語 🎉👍🏽 "q" back\\slash\ttab\n\u2028\u0001\u007f', T0 + 3
    )
    ids["topic"] = _state(room, "m.room.topic", {"topic": "New topic ✓"}, T0 + 4)
    current = room.state_event("m.room.power_levels")
    assert current is not None
    pl = current["content"]
    pl = {**pl, "users": {**pl["users"], BOB: 50}}
    ids["pl_bob50"] = _state(room, "m.room.power_levels", pl, T0 + 5)
    ids["msg_bob"] = _message(room, BOB, "Hi, bob here.", T0 + 6)
    ids["hv_shared"] = _state(
        room, "m.room.history_visibility", {"history_visibility": "shared"}, T0 + 7
    )
    return room, ids


# --- events are valid, signed, linear -------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_every_event_passes_the_receipt_checks(version: str) -> None:
    room, _ = _busy_room(version)
    keys = _keys()
    assert [e["type"] for e in room.events] == [
        "m.room.create",
        "m.room.member",
        "m.room.power_levels",
        "m.room.canonical_alias",
        "m.room.join_rules",
        "m.room.history_visibility",
        "m.room.name",
        "m.room.topic",
        "m.room.member",
        "m.room.message",
        "m.room.message",
        "m.room.topic",
        "m.room.power_levels",
        "m.room.message",
        "m.room.history_visibility",
    ]
    for position, (event_id, pdu) in enumerate(zip(room.event_ids, room.events, strict=True)):
        verdict = check_pdu(pdu, room.rules, keys)
        assert (verdict.outcome, verdict.reason) == ("accept", "ok"), position
        assert verdict.event_id == event_id == compute_event_id(pdu, room.rules)
        assert "event_id" not in pdu and "origin" not in pdu and "unsigned" not in pdu
        assert pdu["depth"] == position + 1
        assert pdu["prev_events"] == room.event_ids[position - 1 : position]
        assert pdu["origin_server_ts"] >= T0
        if position:
            assert pdu["room_id"] == room.room_id
        assert room.index_of(event_id) == position and room.event(event_id) is pdu
    assert room.latest() == (room.event_ids[-1], room.events[-1])
    assert room.events[9]["content"]["body"] == "hello"
    assert room.events[10]["content"]["body"].startswith("Grüße — 日本語 🎉")


@pytest.mark.parametrize("version", VERSIONS)
def test_room_id_and_create_event(version: str) -> None:
    room = _room(version)
    create = room.events[0]
    assert create["content"]["room_version"] == version
    if version == "12":
        assert "room_id" not in create
        assert room.room_id == room_id_for_create(create, room.rules)
        assert room.room_id == "!" + room.event_ids[0][1:]
    else:
        assert re.fullmatch(rf"![A-Za-z]{{18}}:{re.escape(SERVER)}", room.room_id)
        assert create["room_id"] == room.room_id
    assert ("creator" in create["content"]) == (version == "10")
    power_levels = room.state_event("m.room.power_levels")
    assert power_levels is not None
    assert power_levels["content"]["users"] == ({} if version == "12" else {ALICE: 100})
    # v10/v11 room IDs are random; a v12 room ID is a hash, so only the content makes it
    # unique: the same creator at the same millisecond founds the same room
    if version == "12":
        assert _room(version).room_id == room.room_id
        assert _room(version, now_ms=T0 + 1).room_id != room.room_id
    else:
        assert _room(version).room_id != room.room_id


@pytest.mark.parametrize("version", VERSIONS)
def test_auth_events_follow_the_selection_rules(version: str) -> None:
    room, ids = _busy_room(version)
    create = [] if version == "12" else [ids["create"]]

    def auth(name: str) -> list[str]:
        pdu = room.event(ids[name])
        assert pdu is not None
        auth_events: list[str] = pdu["auth_events"]
        return auth_events

    assert room.events[0]["auth_events"] == []
    assert auth("alice_join") == create
    assert auth("pl_initial") == [*create, ids["alice_join"]]
    # a join: create, power levels, (no member event for bob yet), join rules
    assert auth("bob_join") == [*create, ids["pl_initial"], ids["join_rules"]]
    # a message: create, power levels, the sender's member event
    assert auth("msg_plain") == [*create, ids["pl_initial"], ids["alice_join"]]
    assert auth("msg_bob") == [*create, ids["pl_bob50"], ids["bob_join"]]
    # a power-levels change: the power levels it replaces
    assert auth("pl_bob50") == [*create, ids["pl_initial"], ids["alice_join"]]
    assert auth("hv_shared") == [*create, ids["pl_bob50"], ids["alice_join"]]
    # a leave: no join rules
    leave_id, leave = room.leave(KEY, BOB, T0 + 10)
    assert leave["auth_events"] == [*create, ids["pl_bob50"], ids["bob_join"]]
    # an invite: the target's member event and the join rules
    _, invite = room.send(
        KEY,
        sender=ALICE,
        type="m.room.member",
        state_key=BOB,
        content={"membership": "invite"},
        now_ms=T0 + 11,
    )
    assert invite["auth_events"] == [
        *create,
        ids["pl_bob50"],
        ids["alice_join"],
        leave_id,
        ids["join_rules"],
    ]


# --- the same room as Synapse makes it --------------------------------------------------------


def _shape(pdu: dict[str, Any], position_of: dict[str, int]) -> dict[str, Any]:
    """What must match Synapse, with event IDs replaced by positions in the room."""
    content = dict(pdu["content"])
    if "redacts" in content:
        content["redacts"] = position_of[content["redacts"]]
    shape = {
        "keys": sorted(pdu),
        "type": pdu["type"],
        "sender": pdu["sender"],
        "state_key": pdu.get("state_key"),
        "content": content,
        "depth": pdu["depth"],
        "prev_events": [position_of[e] for e in pdu["prev_events"]],
        "auth_events": sorted(position_of[e] for e in pdu["auth_events"]),
    }
    if "redacts" in pdu:
        shape["redacts"] = position_of[pdu["redacts"]]
    return shape


def _replay(version: str, upto: int | None = None) -> tuple[TestbedRoom, dict[str, Any]]:
    """Rebuild the fixture room of ``vN.json`` (optionally only its first ``upto`` events)
    with the model: the same server, users, alias, name, topic, then the same events."""
    data = _fixture(f"v{version}.json")
    entries = data["events"][:upto]
    pdus = [e.get("pdu_before_redaction", e["pdu"]) for e in entries]
    by_type = {(p["type"], p.get("state_key")): p for p in reversed(pdus[:8])}
    creator = pdus[0]["sender"]
    room = TestbedRoom.create(
        server_name=data["server_name"],
        signing_key=KEY,
        room_version=version,
        creator=creator,
        now_ms=pdus[0]["origin_server_ts"],
        alias=by_type["m.room.canonical_alias", ""]["content"]["alias"],
        name=by_type["m.room.name", ""]["content"]["name"],
        topic=by_type["m.room.topic", ""]["content"]["topic"],
    )
    assert len(room.events) == 8
    ours = {e["event_id"]: room.event_ids[i] for i, e in enumerate(entries[:8])}
    for entry, pdu in zip(entries[8:], pdus[8:], strict=True):
        now_ms = pdu["origin_server_ts"]
        if pdu["type"] == "m.room.member":
            assert pdu["content"]["membership"] == "join"
            event_id, _ = room.join(KEY, pdu["state_key"], now_ms)
        elif pdu["type"] == "m.room.redaction":
            target = pdu.get("redacts") or pdu["content"]["redacts"]
            event_id, _ = room.redact_event(
                KEY,
                sender=pdu["sender"],
                event_id=ours[target],
                reason=pdu["content"]["reason"],
                now_ms=now_ms,
            )
        else:
            event_id, _ = room.send(
                KEY,
                sender=pdu["sender"],
                type=pdu["type"],
                state_key=pdu.get("state_key"),
                content=pdu["content"],
                now_ms=now_ms,
            )
        ours[entry["event_id"]] = event_id
    return room, data


@pytest.mark.parametrize("version", VERSIONS)
def test_replaying_the_synapse_fixture_gives_the_same_events(version: str) -> None:
    room, data = _replay(version)
    theirs = [e.get("pdu_before_redaction", e["pdu"]) for e in data["events"]]
    their_positions = {e["event_id"]: i for i, e in enumerate(data["events"])}
    our_positions = {event_id: i for i, event_id in enumerate(room.event_ids)}
    assert len(room.events) == len(theirs) == 17
    for position, (ours, synapse) in enumerate(zip(room.events, theirs, strict=True)):
        assert _shape(ours, our_positions) == _shape(synapse, their_positions), position
    keys = _keys(data["server_name"])
    assert all(check_pdu(pdu, room.rules, keys).accepted for pdu in room.events)


@pytest.mark.parametrize("version", ["10", "12"])
def test_peek_snapshot_matches_the_synapse_fixture(version: str) -> None:
    """State and auth chain at bob's message, as in ``peek-response-vN.json``."""
    peek = _fixture(f"peek-response-v{version}.json")["_fixture"]
    data = _fixture(f"v{version}.json")
    their_positions = {e["event_id"]: i for i, e in enumerate(data["events"])}
    upto = their_positions[peek["latest_event_id"]] + 1
    room, _ = _replay(version, upto)
    state = room.current_state()
    assert [room.index_of(i) for i in room.state_ids_at(room.latest()[0])] == [
        their_positions[i] for i in peek["state_event_ids"]
    ]
    assert [room.events.index(p) for p in state] == [
        their_positions[i] for i in peek["state_event_ids"]
    ]
    chain = room.auth_chain(state)
    assert [room.events.index(p) for p in chain] == [
        their_positions[i] for i in peek["auth_chain_event_ids"]
    ]
    assert room.auth_chain_ids(state) == [compute_event_id(p, room.rules) for p in chain]
    assert room.events[0] in chain
    assert room.is_world_readable()


# --- queries ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_state_at_and_current_state(version: str) -> None:
    room, ids = _busy_room(version)
    e = room.event_ids
    assert room.state_at(e[0]) == [room.events[0]]
    assert room.state_ids_at(e[1]) == e[:2]
    # after the initial batch: 8 state events, one per key
    assert room.state_ids_at(e[7]) == e[:8]
    # a message changes nothing; state after a state event includes it
    assert room.state_ids_at(ids["msg_plain"]) == room.state_ids_at(ids["bob_join"]) == e[:9]
    after_topic = room.state_ids_at(ids["topic"])
    assert ids["topic"] in after_topic and e[7] not in after_topic
    assert after_topic == [*e[:7], e[8], ids["topic"]]
    assert room.state_ids_at(ids["pl_bob50"]) == [e[0], e[1], *e[3:7], e[8], e[11], e[12]]
    current = room.current_state()
    assert current == room.state_at(room.latest()[0])
    assert [room.events.index(p) for p in current] == [0, 1, 3, 4, 6, 8, 11, 12, 14]
    assert room.history_visibility() == "shared" and not room.is_world_readable()
    assert room.canonical_alias() == f"#busy:{SERVER}"
    assert room.joined_users() == [ALICE, BOB]
    room.leave(KEY, BOB, T0 + 20)
    assert room.joined_users() == [ALICE] and room.membership(BOB) == "leave"
    with pytest.raises(UnknownEventError):
        room.state_at("$nope")
    with pytest.raises(UnknownEventError):
        room.state_ids_at("$nope")
    assert room.event("$nope") is None and room.index_of("$nope") is None


@pytest.mark.parametrize("version", VERSIONS)
def test_auth_chain(version: str) -> None:
    room, ids = _busy_room(version)

    def positions(pdus: list[dict[str, Any]]) -> list[int]:
        return [room.events.index(p) for p in pdus]

    bob_message = room.event(ids["msg_bob"])
    assert bob_message is not None
    # msg_bob -> pl_bob50, bob_join (and create); pl_bob50 -> pl_initial, alice_join;
    # bob_join -> pl_initial, join_rules; join_rules -> alice_join, pl_initial
    assert positions(room.auth_chain([bob_message])) == [0, 1, 2, 4, 8, 12]
    # the given PDU is not in its own chain; the create event is (implicitly in v12)
    assert positions(room.auth_chain([room.events[1]])) == [0]
    assert room.auth_chain([room.events[0]]) == []
    assert room.auth_chain([]) == []
    # state (0 1 3 4 6 8 11 12 14) reaches create, alice's join, both power levels and the
    # join rules; bob's join is state but no state event reaches it
    chain = room.auth_chain(room.current_state())
    assert room.events[0] in chain
    assert positions(chain) == [0, 1, 2, 4, 12]
    assert room.auth_chain_ids(room.current_state()) == [
        room.event_ids[p] for p in positions(chain)
    ]


def _linear(version: str, messages: int) -> TestbedRoom:
    room = _room(version)
    for n in range(messages):
        _message(room, ALICE, f"m{n}", T0 + n)
    return room


def test_backfill() -> None:
    room = _linear("12", 6)  # 5 initial events + 6 messages
    e, events = room.event_ids, room.events
    assert room.backfill([e[8]], 3) == [events[8], events[7], events[6]]
    assert room.backfill([e[2]], 10) == [events[2], events[1], events[0]]
    assert room.backfill([e[4], e[9]], 2) == [events[9], events[8]]
    assert room.backfill(["$unknown", e[1]], 5) == [events[1], events[0]]
    assert room.backfill(["$unknown"], 5) == []
    assert room.backfill([e[5]], 0) == []
    assert room.backfill([e[-1]], 100) == events[::-1]


def test_missing_events() -> None:
    room = _linear("11", 6)
    e, events = room.event_ids, room.events
    assert room.missing_events([e[3]], [e[9]], 10, 0) == events[4:9]
    assert room.missing_events([e[3]], [e[9]], 2, 0) == events[7:9]
    assert room.missing_events([e[3]], [e[9]], 10, events[6]["depth"]) == events[6:9]
    assert room.missing_events([], [e[3]], 10, 0) == events[0:3]
    assert room.missing_events([e[9]], [e[9]], 10, 0) == []
    assert room.missing_events([e[3]], [e[9]], 0, 0) == []
    assert room.missing_events([e[3]], ["$unknown"], 10, 0) == []
    # two latest events: neither is returned, even though one is the other's ancestor
    assert room.missing_events([e[3]], [e[9], e[7]], 10, 0) == [*events[4:7], events[8]]


def test_forked_dag_backfill_and_missing_events() -> None:
    room = _linear("10", 1)  # positions 0-5
    base = room.event_ids[5]
    a1, _ = room.send(
        KEY, sender=ALICE, type="m.room.message", content={"body": "a1"}, now_ms=T0 + 10
    )
    b1, _ = room.send(
        KEY,
        sender=ALICE,
        type="m.room.message",
        content={"body": "b1"},
        now_ms=T0 + 11,
        prev_events=[base],
    )
    a2, _ = room.send(
        KEY,
        sender=ALICE,
        type="m.room.message",
        content={"body": "a2"},
        now_ms=T0 + 12,
        prev_events=[a1],
    )
    merge, pdu = room.send(
        KEY,
        sender=ALICE,
        type="m.room.message",
        content={"body": "merge"},
        now_ms=T0 + 13,
        prev_events=[a2, b1],
    )
    depth = {i: room.events[room.index_of(i) or 0]["depth"] for i in (base, a1, b1, a2, merge)}
    assert depth == {base: 6, a1: 7, b1: 7, a2: 8, merge: 9}
    assert pdu["prev_events"] == [a2, b1]

    def ids(pdus: list[dict[str, Any]]) -> list[str]:
        return [compute_event_id(p, room.rules) for p in pdus]

    # newest first: by depth, then later in stream order first
    assert ids(room.backfill([merge], 5)) == [merge, a2, b1, a1, base]
    assert ids(room.missing_events([b1], [merge], 10, 0)) == [a1, a2]
    assert ids(room.missing_events([base], [merge], 10, 0)) == [a1, b1, a2]
    with pytest.raises(UnknownEventError):
        room.send(
            KEY, sender=ALICE, type="m.room.message", content={}, now_ms=T0, prev_events=["$x"]
        )
    with pytest.raises(RoomError, match="empty"):
        room.send(KEY, sender=ALICE, type="m.room.message", content={}, now_ms=T0, prev_events=[])


def test_server_acl() -> None:
    room = _room("12")
    assert room.server_acl_allows("anything.example")
    _state(
        room,
        "m.room.server_acl",
        {
            "allow": ["*"],
            "deny": ["evil.example", "*.bad.test", "ab?.test"],
            "allow_ip_literals": False,
        },
        T0 + 1,
    )
    for allowed in ("good.test", "good.test:8448", "bad.test", "abcd.test", "ab.test"):
        assert room.server_acl_allows(allowed), allowed
    for denied in (
        "evil.example",
        "EVIL.Example:443",
        "x.bad.test",
        "a.b.bad.test",
        "abc.test",
        "1.2.3.4",
        "1.2.3.4:8448",
        "[::1]:8448",
        "not a server",
    ):
        assert not room.server_acl_allows(denied), denied
    _state(room, "m.room.server_acl", {"allow": ["*.ok.test", 5], "deny": "junk"}, T0 + 2)
    assert room.server_acl_allows("a.ok.test")
    assert room.server_acl_allows("1.2.3.4") is False  # not in allow
    assert not room.server_acl_allows("other.test")
    _state(room, "m.room.server_acl", {"allow": ["*"]}, T0 + 3)
    assert room.server_acl_allows("1.2.3.4") and room.server_acl_allows("[::1]")


@pytest.mark.parametrize("version", VERSIONS)
def test_visibility_encryption_and_initial_state(version: str) -> None:
    plain = _room(version)
    assert plain.is_world_readable() and not plain.is_encrypted()
    assert plain.history_visibility() == "world_readable"
    assert plain.canonical_alias() is None and plain.join_rule() == "public"
    assert len(plain.events) == 5  # create, join, power levels, join rules, visibility
    acl = {"allow": ["*"], "deny": ["evil.test"]}
    room = _room(
        version,
        history_visibility="shared",
        encrypted=True,
        join_rule="invite",
        initial_state=[
            {"type": "m.room.server_acl", "content": acl},
            {"type": "org.example.custom", "state_key": "k", "content": {"n": 1}},
        ],
    )
    assert room.is_encrypted() and not room.is_world_readable()
    assert room.history_visibility() == "shared"
    assert [(e["type"], e["state_key"]) for e in room.events[-3:]] == [
        ("m.room.encryption", ""),
        ("m.room.server_acl", ""),
        ("org.example.custom", "k"),
    ]
    assert room.events[-3]["content"] == {"algorithm": "m.megolm.v1.aes-sha2"}
    assert room.events[-2]["content"] == acl
    assert not room.server_acl_allows("evil.test")
    with pytest.raises(RoomError, match="initial_state"):
        _room(version, initial_state=[{"type": "x"}])


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_room_errors(version: str) -> None:
    room = _room(version)
    with pytest.raises(RoomError, match=REFUSED):
        _message(room, BOB, "hi", T0)
    with pytest.raises(RoomError, match="not a user of this server"):
        _message(room, "@eve:other.test", "hi", T0)
    with pytest.raises(RoomError, match="not a user of this server"):
        room.join(KEY, "@eve:other.test", T0)
    with pytest.raises(RoomError, match="invalid sender"):
        _message(room, "alice", "hi", T0)
    with pytest.raises(RoomError, match="would not be accepted by peers"):
        room.send(KEY, sender=ALICE, type="m.room.message", content={"n": 1.5}, now_ms=T0)
    with pytest.raises(RoomError, match="not JSON"):
        room.send(KEY, sender=ALICE, type="m.room.message", content={"x": object()}, now_ms=T0)
    with pytest.raises(RoomError, match="exactly one"):
        room.send(KEY, sender=ALICE, type="m.room.create", state_key="", content={}, now_ms=T0)
    before = len(room.events)
    room.join(KEY, BOB, T0 + 1)
    room.leave(KEY, BOB, T0 + 2)
    with pytest.raises(RoomError, match=REFUSED):
        _message(room, BOB, "hi", T0 + 3)
    with pytest.raises(RoomError, match=REFUSED):
        room.leave(KEY, BOB, T0 + 3)
    assert len(room.events) == before + 2  # failed sends leave no trace
    with pytest.raises(RoomError, match="not a user of this server"):
        _room(version, creator="@alice:elsewhere.test")


def test_invite_only_rooms_need_an_invite() -> None:
    room = _room("11", join_rule="invite")
    with pytest.raises(RoomError, match=REFUSED):
        room.join(KEY, BOB, T0)
    room.send(
        KEY,
        sender=ALICE,
        type="m.room.member",
        state_key=BOB,
        content={"membership": "invite"},
        now_ms=T0 + 1,
    )
    room.join(KEY, BOB, T0 + 2)
    assert room.joined_users() == [ALICE, BOB]


@pytest.mark.parametrize("version", ["9", "13", "1", "org.matrix.msc4289"])
def test_unsupported_room_versions(version: str) -> None:
    with pytest.raises(RoomError, match="room version"):
        _room(version)


# --- persistence ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_json_round_trip(version: str) -> None:
    room, _ = _busy_room(version)
    saved = json.loads(json.dumps(room.to_json(), ensure_ascii=False))
    assert set(saved) == {"room_id", "room_version", "server_name", "events"}
    loaded = TestbedRoom.from_json(saved)
    assert loaded.room_id == room.room_id and loaded.rules == room.rules
    assert loaded.server_name == room.server_name
    assert loaded.events == room.events and loaded.event_ids == room.event_ids
    assert loaded.current_state() == room.current_state()
    for event_id in room.event_ids:
        assert loaded.state_ids_at(event_id) == room.state_ids_at(event_id)
    assert loaded.auth_chain(loaded.current_state()) == room.auth_chain(room.current_state())
    # the loaded room carries on
    event_id = _message(loaded, BOB, "after reload", T0 + 100)
    assert loaded.latest()[0] == event_id and len(room.events) == len(loaded.events) - 1


@pytest.mark.parametrize("version", VERSIONS)
def test_from_json_refuses_inconsistent_rooms(version: str) -> None:
    room, _ = _busy_room(version)

    def broken(change: Any) -> dict[str, Any]:
        data = room.to_json()
        change(data)
        return data

    def tamper(data: dict[str, Any]) -> None:
        data["events"][9]["content"]["body"] = "tampered"

    cases = {
        "content hash": tamper,
        "not in|founds": lambda d: d.update(room_id="!other:hs.test"),
        "at least": lambda d: d.update(events=[]),
        "room version": lambda d: d.update(room_version="9"),
        "duplicate|earlier": lambda d: d["events"].append(d["events"][5]),
        "not an m.room.create": lambda d: d["events"].pop(0),
        "needs string": lambda d: d.pop("server_name"),
    }
    for match, change in cases.items():
        with pytest.raises(RoomError, match=match):
            TestbedRoom.from_json(broken(change))


# --- content a receiving server would reject -------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_state_content_checks(version: str) -> None:
    room = _room(version)
    before = len(room.events)
    for value in HISTORY_VISIBILITIES:
        _state(room, "m.room.history_visibility", {"history_visibility": value}, T0)
    for value in JOIN_RULES:
        _state(room, "m.room.join_rules", {"join_rule": value}, T0)
    _state(room, "m.room.join_rules", {"join_rule": "public"}, T0)
    count = len(room.events)
    assert count == before + len(HISTORY_VISIBILITIES) + len(JOIN_RULES) + 1
    bad: list[tuple[str, str | None, dict[str, Any], str]] = [
        ("m.room.history_visibility", "", {"history_visibility": "everyone"}, "one of"),
        ("m.room.history_visibility", "", {}, "one of"),
        ("m.room.join_rules", "", {"join_rule": "open"}, "one of"),
        ("m.room.member", "bob", {"membership": "invite"}, "user ID"),
        ("m.room.member", f"@Bob Smith:{SERVER}", {"membership": "invite"}, "local user"),
        ("m.room.member", BOB, {"membership": "befriend"}, REFUSED),
        ("m.room.canonical_alias", "", {"alias": 5}, "alias string"),
        ("m.room.canonical_alias", "", {"alias": "busy"}, "not a valid room alias"),
        ("m.room.canonical_alias", "", {"alias": "#x:other.test"}, "not an alias of this"),
        ("m.room.canonical_alias", "", {"alt_aliases": "#x:hs.test"}, "must be a list"),
        ("m.room.canonical_alias", "", {"alt_aliases": ["#x:hs.test", None]}, r"alt_aliases\[1\]"),
    ]
    for type_, state_key, content, match in bad:
        with pytest.raises(RoomError, match=match):
            room.send(
                KEY, sender=ALICE, type=type_, state_key=state_key, content=content, now_ms=T0
            )
    with pytest.raises(RoomError, match="may only use"):
        room.join(KEY, f"@Bob:{SERVER}", T0)
    with pytest.raises(RoomError, match="may only use"):
        _room(version, creator=f"@alice smith:{SERVER}")
    with pytest.raises(RoomError, match="one of"):
        _room(version, history_visibility="public")
    with pytest.raises(RoomError, match="one of"):
        _room(version, join_rule="open")
    assert len(room.events) == count  # nothing was appended
    # a non-empty state key is not the room's setting: not checked
    room.send(
        KEY,
        sender=ALICE,
        type="m.room.join_rules",
        state_key="other",
        content={"join_rule": "anything"},
        now_ms=T0,
    )
    assert room.join_rule() == "public"


@pytest.mark.parametrize("version", VERSIONS)
def test_power_levels_keep_the_creator_in_power(version: str) -> None:
    room = _room(version)
    current = room.state_event("m.room.power_levels")
    assert current is not None
    base = current["content"]
    assert room.creators() == [ALICE]
    if version == "12":
        ok = [{**base, "users": {BOB: 100}}, {**base, "users": {}, "users_default": 0}]
        bad = [({**base, "users": {ALICE: 100}}, REFUSED)]
    else:
        ok = [
            {**base, "users": {ALICE: 100, BOB: 50}},
            {**base, "users": {}, "users_default": 100},
        ]
        bad = [
            ({**base, "users": {ALICE: 150}}, REFUSED),  # above her own level
            ({**base, "users": {ALICE: 50}}, "power level 50"),
            ({**base, "users": {}}, "power level 0"),
            ({**base, "users": {BOB: 100}, "users_default": 10}, "power level 10"),
        ]
    bad += [
        ({**base, "ban": "50"}, REFUSED),
        ({**base, "kick": True}, REFUSED),
        ({**base, "events": {"m.room.name": "50"}}, REFUSED),
        ({**base, "notifications": []}, REFUSED),
        ({**base, "users": {**base["users"], "bob": 50}}, REFUSED),
        ({**base, "users": []}, "'users' must be an object"),
    ]
    for content in ok:
        _state(room, "m.room.power_levels", content, T0 + 1)
    count = len(room.events)
    for content, match in bad:
        with pytest.raises(RoomError, match=match):
            _state(room, "m.room.power_levels", content, T0 + 2)
    assert len(room.events) == count
    # initial_state goes through the same checks
    with pytest.raises(RoomError, match="power" if version != "12" else REFUSED):
        _room(
            version,
            initial_state=[{"type": "m.room.power_levels", "content": {**base, "users": {}}}]
            if version != "12"
            else [{"type": "m.room.power_levels", "content": {**base, "users": {ALICE: 100}}}],
        )


def test_canonical_aliases_and_local_aliases() -> None:
    assert canonical_aliases({}, SERVER) == []
    assert canonical_aliases({"alias": None, "alt_aliases": None}, SERVER) == []
    assert canonical_aliases({"alias": ""}, SERVER) == []
    claimed = {"alias": f"#a:{SERVER}", "alt_aliases": [f"#b:{SERVER}", f"#a:{SERVER}"]}
    assert canonical_aliases(claimed, SERVER) == [f"#a:{SERVER}", f"#b:{SERVER}"]
    room = _room("11", alias=f"#a:{SERVER}")
    assert room.local_aliases() == [f"#a:{SERVER}"] and room.canonical_alias() == f"#a:{SERVER}"
    _state(room, "m.room.canonical_alias", claimed, T0 + 1)
    assert room.local_aliases() == [f"#a:{SERVER}", f"#b:{SERVER}"]
    _state(room, "m.room.canonical_alias", {"alias": "", "alt_aliases": []}, T0 + 2)
    assert room.local_aliases() == [] and room.canonical_alias() is None


@pytest.mark.parametrize("version", VERSIONS)
def test_from_json_checks_server_name_and_signatures(version: str) -> None:
    room, _ = _busy_room(version)
    saved = json.loads(json.dumps(room.to_json()))
    loaded = TestbedRoom.from_json(saved, server_name=SERVER, signing_key=KEY)
    assert loaded.event_ids == room.event_ids
    with pytest.raises(RoomError, match=r"belongs to server 'hs\.test', not 'other\.test'"):
        TestbedRoom.from_json(saved, server_name="other.test", signing_key=KEY)
    other_key = generate_signing_key("tb2")
    with pytest.raises(RoomError, match=r"event 0 .*fails the checks peers run.*ed25519:tb2"):
        TestbedRoom.from_json(saved, server_name=SERVER, signing_key=other_key)
    # a forged signature (the content hash still matches) is caught with the key
    forged = json.loads(json.dumps(saved))
    signatures = forged["events"][3]["signatures"][SERVER]
    signatures[next(iter(signatures))] = "A" * 86
    TestbedRoom.from_json(forged)  # no key: signatures are not checked
    with pytest.raises(RoomError, match=r"event 3 .*fails the checks peers run"):
        TestbedRoom.from_json(forged, signing_key=KEY)


@pytest.mark.parametrize("version", VERSIONS)
def test_power_levels_are_enforced_by_the_shared_auth_rules(version: str) -> None:
    """The testbed's users are held to the room's power levels: the auth rules of
    :mod:`peekproxy.core.auth_rules`, not the testbed's own membership checks of before."""
    room = _room(version)
    room.join(KEY, BOB, T0 + 1)
    count = len(room.events)
    with pytest.raises(RoomError, match=REFUSED):  # state_default 50, bob has 0
        _state(room, "m.room.name", {"name": "bob's"}, T0 + 2, sender=BOB)
    with pytest.raises(RoomError, match=REFUSED):  # ban level 50
        room.send(
            KEY,
            sender=BOB,
            type="m.room.member",
            state_key=ALICE,
            content={"membership": "ban"},
            now_ms=T0 + 2,
        )
    with pytest.raises(RoomError, match=REFUSED):  # the join rules need 50 too
        _state(room, "m.room.join_rules", {"join_rule": "invite"}, T0 + 2, sender=BOB)
    assert len(room.events) == count
    _state(room, "m.room.name", {"name": "alice's"}, T0 + 3)  # the creator may
    assert room.state_event("m.room.name") is not None

"""Receipt steps 4-6 over a batch (peekproxy/core/receipt.py): the order events are judged
in, what a rejected or missing auth event does to the events after it, and when an event
that its own auth events allow is rejected (step 5) or soft-failed (step 6)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from peekproxy.core.receipt import cited_auth_ids, judge_batch
from peekproxy.core.room_versions import room_version
from tests.auth_rooms import ALICE, BOB, CAROL, Room

V10 = room_version("10")
SYNAPSE_ROOMS = Path(__file__).parent / "fixtures" / "synapse-rooms"


def _room(version: str = "10") -> Room:
    """alice's public room with bob joined."""
    room = Room(version)
    assert room.send("m.room.member", ALICE, {"membership": "join"}, ALICE) is None
    # v12: the creator has infinite power and must not be listed (MSC4289).
    users = {} if room.rules.auth.privileged_creators else {ALICE: 100}
    assert room.send("m.room.power_levels", ALICE, {"users": users}, "") is None
    assert room.send("m.room.join_rules", ALICE, {"join_rule": "public"}, "") is None
    assert room.send("m.room.member", BOB, {"membership": "join"}, BOB) is None
    return room


def _current(room: Room) -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
    return {key: (event_id, room.events[event_id]) for key, event_id in room.state.items()}


def test_a_batch_is_judged_auth_events_first_whatever_its_order() -> None:
    room = Room("10")
    built = []
    for args in (
        ("m.room.member", ALICE, {"membership": "join"}, ALICE),
        ("m.room.power_levels", ALICE, {"users": {ALICE: 100}}, ""),
        ("m.room.message", ALICE, {"body": "hi"}, None),
    ):
        event_id, pdu = room.build(*args)
        room.commit(event_id, pdu, accepted=True)
        built.append((event_id, pdu))
    batch = dict(reversed([(room.create_id, room.create), *built]))
    judgement = judge_batch(batch, V10, stored={})
    assert judgement.accepted == [room.create_id, *(e for e, _ in built)]
    assert not judgement.rejected and not judgement.unknown


def test_an_event_citing_a_rejected_one_is_rejected_and_a_missing_one_unknown() -> None:
    room = _room()
    # bob (power 0) changes the power levels: rejected; carol's join cites it.
    bad_id, bad = room.build("m.room.power_levels", BOB, {"users": {BOB: 100}}, "")
    cites_id, cites = room.build(
        "m.room.member",
        CAROL,
        {"membership": "join"},
        CAROL,
        auth=[*room.auth_ids("m.room.member", CAROL, {"membership": "join"}, CAROL), bad_id],
        prev=[bad_id],
    )
    lost_id, lost = room.build("m.room.message", BOB, {"body": "x"}, auth=["$nowhere"])
    judgement = judge_batch({bad_id: bad, cites_id: cites, lost_id: lost}, V10, stored=room.events)
    assert judgement.rejected[bad_id].startswith("not allowed by its auth events")
    assert "was rejected" in judgement.rejected[cites_id]
    assert judgement.unknown == {lost_id: "auth event $nowhere is unknown"}
    assert judgement.accepted == []


def test_step_5_rejects_an_event_the_state_before_it_forbids() -> None:
    room = _room()
    message_auth = room.auth_ids("m.room.message", BOB, {}, None)
    assert room.send("m.room.member", ALICE, {"membership": "ban"}, BOB) is None
    # bob's message cites his join (allowed by its own auth events) but extends the room
    # after his ban: the state before it says he is banned.
    message_id, message = room.build("m.room.message", BOB, {"body": "x"}, auth=message_auth)
    judgement = judge_batch(
        {message_id: message}, V10, stored=room.events, state=_current(room), head=room.last
    )
    assert list(judgement.rejected) == [message_id]
    assert "state before it" in judgement.rejected[message_id]


def test_step_6_soft_fails_a_fork_the_current_state_forbids() -> None:
    room = _room()
    # bob's message is concurrent with his ban (its prev_events are from before it).
    fork_id, fork = room.build("m.room.message", BOB, {"body": "from an old fork"})
    assert room.send("m.room.member", ALICE, {"membership": "ban"}, BOB) is None
    judgement = judge_batch(
        {fork_id: fork}, V10, stored=room.events, state=_current(room), head=room.last
    )
    assert list(judgement.soft_failed) == [fork_id]
    assert "current state" in judgement.soft_failed[fork_id]
    # History (no state given) is judged by its own auth events only: allowed.
    assert judge_batch({fork_id: fork}, V10, stored=room.events).accepted == [fork_id]


def test_state_lagging_behind_a_gap_does_not_hide_a_legal_event() -> None:
    room = _room()
    assert room.send("m.room.member", BOB, {"membership": "leave"}, BOB) is None
    lagging, head = _current(room), list(room.last)  # what peekproxy holds: bob left
    # In a gap peekproxy could not fill: bob joins again and speaks.
    assert room.send("m.room.member", BOB, {"membership": "join"}, BOB) is None
    message_id, message = room.build("m.room.message", BOB, {"body": "back"})
    judgement = judge_batch(
        {message_id: message}, V10, stored=room.events, state=lagging, head=head
    )
    assert judgement.accepted == [message_id]


def test_accepted_events_of_a_batch_move_the_state_the_next_are_judged_by() -> None:
    room = _room()
    state, head = _current(room), list(room.last)
    # One /send: alice bans bob, then bob speaks after the ban (citing his old join).
    message_auth = room.auth_ids("m.room.message", BOB, {}, None)
    ban_id, ban = room.build("m.room.member", ALICE, {"membership": "ban"}, BOB)
    room.commit(ban_id, ban, accepted=True)
    message_id, message = room.build("m.room.message", BOB, {"body": "x"}, auth=message_auth)
    judgement = judge_batch(
        {message_id: message, ban_id: ban}, V10, stored=room.events, state=state, head=head
    )
    assert judgement.accepted == [ban_id]
    assert "state before it" in judgement.rejected[message_id]


def test_v12_events_cite_the_create_event_through_the_room_id() -> None:
    room = _room("12")
    event_id, pdu = room.build("m.room.message", BOB, {"body": "hi"})
    assert cited_auth_ids(pdu, room.rules)[-1] == "$" + str(room.room_id)[1:]
    assert judge_batch({event_id: pdu}, room.rules, stored=room.events).accepted == [event_id]


@pytest.mark.parametrize("version", [str(v) for v in range(1, 13)])
def test_synapse_rooms_pass_as_one_live_batch(version: str) -> None:
    # Every event of a room Synapse made (tests/fixtures/synapse-rooms), in any order, from
    # an empty room: judged by its auth events and by the state before it, all shown.
    fixture = json.loads((SYNAPSE_ROOMS / f"v{version}.json").read_text())
    events = {e["event_id"]: e["pdu"] for e in reversed(fixture["events"])}
    judgement = judge_batch(events, room_version(version), stored={}, state={}, head=())
    assert not (judgement.rejected or judgement.soft_failed or judgement.unknown)
    assert judgement.accepted == [e["event_id"] for e in fixture["events"]]


def test_a_banned_member_cannot_come_back_through_a_deep_soft_failed_join() -> None:
    # A review found it: bob's server answers his ban with a join on an old fork (soft-
    # failed) with a huge depth, then a message and a second join that cite that join and
    # extend the room. Neither may be shown, nor become peekproxy's state.
    room = _room()
    fork_point = list(room.last)
    join_auth = room.auth_ids("m.room.member", BOB, {"membership": "join"}, BOB)
    old_join = room.state[("m.room.member", BOB)]
    assert room.send("m.room.member", ALICE, {"membership": "ban"}, BOB) is None
    state, head = _current(room), list(room.last)
    fork_id, fork_join = room.build(
        "m.room.member",
        BOB,
        {"membership": "join"},
        BOB,
        auth=join_auth,
        prev=fork_point,
        extra={"depth": 10**9},
    )
    cites_fork = [a for a in join_auth if a != old_join] + [fork_id]
    message_id, message = room.build(
        "m.room.message", BOB, {"body": "banned"}, auth=cites_fork, prev=head
    )
    rejoin_id, rejoin = room.build(
        "m.room.member",
        BOB,
        {"membership": "join"},
        BOB,
        auth=cites_fork,
        prev=head,
        extra={"depth": 10**9 + 1},
    )
    batch = {fork_id: fork_join, message_id: message, rejoin_id: rejoin}
    judgement = judge_batch(batch, V10, stored=room.events, state=state, head=head)
    assert list(judgement.soft_failed) == [fork_id]
    assert set(judgement.rejected) == {message_id, rejoin_id}
    # The same, the fork join stored as soft-failed by an earlier /send.
    later = judge_batch(
        {message_id: message},
        V10,
        stored={**room.events, fork_id: fork_join},
        soft_failed={fork_id},
        state=state,
        head=head,
    )
    assert list(later.rejected) == [message_id]


def test_a_deep_join_from_before_a_ban_does_not_lift_it() -> None:
    # Depth is the sender's to choose: a join bob planted before his ban, however deep,
    # is not after the ban (the ban is not in its auth chain).
    room = _room()
    deep_id, deep = room.build(
        "m.room.member",
        BOB,
        {"membership": "join", "displayname": "b"},
        BOB,
        extra={"depth": 10**9},
    )
    room.commit(deep_id, deep, accepted=True)
    message_auth = room.auth_ids("m.room.message", BOB, {}, None)
    assert deep_id in message_auth
    assert room.send("m.room.member", ALICE, {"membership": "ban"}, BOB) is None
    message_id, message = room.build("m.room.message", BOB, {"body": "x"}, auth=message_auth)
    judgement = judge_batch(
        {message_id: message}, V10, stored=room.events, state=_current(room), head=room.last
    )
    assert list(judgement.rejected) == [message_id]

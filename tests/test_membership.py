"""The observer's membership events and the send_join answer (core/membership.py), from the
real Synapse-signed room fixtures (tests/fixtures/synapse-pdus) and our own key."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from signedjson.key import generate_signing_key, get_verify_key

from peekproxy.core.events import compute_event_id
from peekproxy.core.membership import (
    MAX_HELD_ROOMS,
    InvalidTemplate,
    JoinHolds,
    check_summary,
    joined_room,
    membership_event,
    template_room_version,
)
from peekproxy.core.pdu import check_pdu
from peekproxy.core.pdu_signatures import VerifyKeyInfo, key_table
from peekproxy.core.peekability import acl_denial_reason, observer_removed_reason
from peekproxy.core.room_versions import KNOWN_ROOM_VERSIONS, room_version
from peekproxy.core.validation import InvalidPeekResponse, RoomNotPeekable
from tests.test_peek_validation import KEY as FIXTURE_KEY
from tests.test_peek_validation import KEY_ID as FIXTURE_KEY_ID
from tests.test_peek_validation import VERSIONS, Fixture

OURS = "observer.test"
OBSERVER = f"@peekproxy:{OURS}"
KEY = generate_signing_key("obs1")


@pytest.fixture(params=VERSIONS)
def fx(request: pytest.FixtureRequest) -> Fixture:
    return Fixture(request.param)


def _keys(fx: Fixture) -> Any:
    """The fixture server's keys (its real ones and the test's re-signing key) and ours."""
    table = {
        (fx.server, key_id): VerifyKeyInfo.from_base64(key)
        for key_id, key in fx.meta["verify_keys"].items()
    }
    table[(fx.server, FIXTURE_KEY_ID)] = VerifyKeyInfo(get_verify_key(FIXTURE_KEY))
    table[(OURS, f"{KEY.alg}:{KEY.version}")] = VerifyKeyInfo(get_verify_key(KEY))
    return key_table(table)


def _template(fx: Fixture, membership: str = "join") -> dict[str, Any]:
    """A make_join answer as Synapse gives it for the fixture's room (research §2)."""
    body = fx.body()
    ids = {(p["type"], p["state_key"]): fx.event_id(p) for p in body["state"]}
    # v12 events never cite the create event (it is implied by the room ID, MSC4291).
    # The join rules are an auth event of joins, not of leaves (SSAPI §Auth events selection).
    auth = [ids[("m.room.power_levels", "")]]
    if membership == "join":
        auth.append(ids[("m.room.join_rules", "")])
    if not room_version(fx.version).auth.create_event_implied:
        auth.insert(0, ids[("m.room.create", "")])
    event = {
        "room_id": fx.room_id,
        "auth_events": auth,
        "prev_events": [fx.event_id(body["latest_event"])],
        "content": {"membership": membership},
        "depth": body["latest_event"]["depth"] + 1,
        "origin_server_ts": 1,
        "sender": OBSERVER,
        "state_key": OBSERVER,
        "type": "m.room.member",
    }
    return {"event": event, "room_version": fx.version}


def _ours(
    fx: Fixture, answer: dict[str, Any], membership: str, **kwargs: Any
) -> tuple[str, dict[str, Any]]:
    """Our ``membership`` event from the make_X ``answer`` for the fixture's room."""
    return membership_event(
        answer,
        room_id=fx.room_id,
        user_id=OBSERVER,
        membership=membership,
        server_name=OURS,
        signing_key=KEY,
        **kwargs,
    )


def _join(fx: Fixture) -> tuple[str, dict[str, Any]]:
    return _ours(
        fx,
        _template(fx),
        "join",
        now_ms=1_800_000_000_000,
        displayname="peekproxy observer",
    )


def _send_join_answer(fx: Fixture, join: dict[str, Any]) -> dict[str, Any]:
    body = fx.body()
    return {
        "event": {**join, "unsigned": {}},
        "members_omitted": False,
        "state": body["state"],
        "auth_chain": body["auth_chain"],
    }


def test_our_join_passes_the_receipt_checks_with_our_key(fx: Fixture) -> None:
    event_id, join = _join(fx)
    verdict = check_pdu(join, room_version(fx.version), _keys(fx))
    assert verdict.outcome == "accept", verdict.reason
    assert verdict.event_id == event_id
    assert join["content"] == {"membership": "join", "displayname": "peekproxy observer"}
    assert join["origin_server_ts"] == 1_800_000_000_000
    assert join["prev_events"] == _template(fx)["event"]["prev_events"]


def test_a_leave_has_no_display_name() -> None:
    fx = Fixture("10")
    _, leave = _ours(
        fx,
        _template(fx, "leave"),
        "leave",
        now_ms=5,
        displayname="ignored",
    )
    assert leave["content"] == {"membership": "leave"}


def test_rooms_v1_and_v2_get_an_event_id_of_our_server() -> None:
    fx = Fixture("10")
    answer = _template(fx)
    answer["room_version"] = "1"
    for key in ("auth_events", "prev_events"):  # v1: [event ID, hashes] pairs
        answer["event"][key] = [
            [f"$e{i}:hs-alpha.test", {}] for i, _ in enumerate(answer["event"][key])
        ]
    event_id, pdu = _ours(
        fx,
        answer,
        "join",
        now_ms=5,
    )
    assert event_id == pdu["event_id"] and event_id.endswith(f":{OURS}")
    assert check_pdu(pdu, room_version("1"), _keys(fx)).outcome == "accept"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("room_id", "!other:hs-alpha.test", "room_id"),
        ("sender", "@someone:else.test", "sender"),
        ("state_key", "@someone:else.test", "state_key"),
        ("type", "m.room.message", "type"),
        ("content", {"membership": "leave"}, "not a join"),
        ("content", "join", "not a join"),
        ("auth_events", None, "auth_events"),
        ("prev_events", "$x", "prev_events"),
        ("depth", "3", "depth"),
        ("depth", True, "depth"),
    ],
)
def test_a_template_for_something_else_is_refused(field: str, value: Any, message: str) -> None:
    fx = Fixture("10")
    answer = _template(fx)
    answer["event"][field] = value
    with pytest.raises(InvalidTemplate, match=message):
        _ours(
            fx,
            answer,
            "join",
            now_ms=5,
        )


@pytest.mark.parametrize(
    "answer",
    [
        None,
        [],
        {},
        {"event": "x"},
        {"event": {}, "room_version": "99"},
        {"event": {}, "room_version": 10},
    ],
)
def test_unusable_make_join_answers(answer: Any) -> None:
    with pytest.raises(InvalidTemplate):
        template_room_version(answer, KNOWN_ROOM_VERSIONS)


def test_a_template_without_room_version_is_room_version_1() -> None:
    assert template_room_version({"event": {}}, KNOWN_ROOM_VERSIONS) == "1"
    with pytest.raises(InvalidTemplate, match="'1' is not one we support"):
        template_room_version({"event": {}}, ["10"])


def test_the_send_join_answer_gives_the_room_with_our_join(fx: Fixture) -> None:
    event_id, join = _join(fx)
    room = joined_room(
        _send_join_answer(fx, join),
        room_id=fx.room_id,
        room_version=fx.version,
        join_event_id=event_id,
        join_event=join,
        keys=_keys(fx),
    )
    assert room.latest_event_id == event_id
    assert room.state[("m.room.member", OBSERVER)] == event_id
    assert set(fx.meta["state_event_ids"]) <= set(room.state.values())
    assert "unsigned" not in room.events[event_id]


def test_a_rejoin_replaces_our_old_leave_in_the_state(fx: Fixture) -> None:
    old_join_id, old_join = _ours(fx, _template(fx), "join", now_ms=3)
    # As Synapse does (research §7), a template cites our current membership.
    leave_template = _template(fx, "leave")
    leave_template["event"]["auth_events"].append(old_join_id)
    leave_id, old_leave = _ours(fx, leave_template, "leave", now_ms=4)
    template = _template(fx)
    template["event"]["auth_events"].append(leave_id)
    event_id, join = _ours(
        fx,
        template,
        "join",
        now_ms=1_800_000_000_000,
    )
    answer = _send_join_answer(fx, join)
    answer["state"].append(old_leave)
    answer["auth_chain"].append(old_join)
    room = joined_room(
        answer,
        room_id=fx.room_id,
        room_version=fx.version,
        join_event_id=event_id,
        join_event=join,
        keys=_keys(fx),
    )
    assert room.state[("m.room.member", OBSERVER)] == event_id
    assert compute_event_id(old_leave, room_version(fx.version)) in room.events


def _joined(fx: Fixture, answer: Any) -> Any:
    event_id, join = _join(fx)
    return joined_room(
        answer,
        room_id=fx.room_id,
        room_version=fx.version,
        join_event_id=event_id,
        join_event=join,
        keys=_keys(fx),
    )


def test_partial_state_and_malformed_answers_are_refused(fx: Fixture) -> None:
    _, join = _join(fx)
    answer = _send_join_answer(fx, join)
    with pytest.raises(InvalidPeekResponse, match="omitted members"):
        _joined(fx, answer | {"members_omitted": True})
    with pytest.raises(InvalidPeekResponse, match="no state list"):
        _joined(fx, {"auth_chain": []})
    with pytest.raises(InvalidPeekResponse, match="not a JSON object"):
        _joined(fx, [])
    forged = copy.deepcopy(answer)
    forged["state"][1]["content"]["membership"] = "leave"  # alice's join, signature broken
    with pytest.raises(InvalidPeekResponse, match=r"signature|redact|hash"):
        _joined(fx, forged | {"auth_chain": []})


def test_a_state_that_is_not_world_readable_is_not_peekable(fx: Fixture) -> None:
    _, join = _join(fx)
    answer = _send_join_answer(fx, join)
    shared = fx.state_event(
        fx.body(), "m.room.history_visibility", {"history_visibility": "shared"}
    )
    answer["state"] = [p for p in answer["state"] if p["type"] != "m.room.history_visibility"] + [
        shared
    ]
    with pytest.raises(RoomNotPeekable, match="not world_readable"):
        _joined(fx, answer)


@pytest.mark.parametrize(
    ("room", "error"),
    [
        ({"world_readable": True, "room_version": "10"}, None),
        ({"world_readable": False}, "not world_readable"),
        ({}, "not world_readable"),
        ({"world_readable": "true"}, "not world_readable"),
        ({"world_readable": True, "encryption": "m.megolm.v1.aes-sha2"}, "encrypted"),
    ],
)
def test_the_room_summary_decides_before_joining(room: dict[str, Any], error: str | None) -> None:
    if error is None:
        check_summary({"room": room, "children": []})
    else:
        with pytest.raises(RoomNotPeekable, match=error):
            check_summary({"room": room})


@given(
    st.one_of(
        st.none(),
        st.integers(),
        st.text(),
        st.lists(st.integers()),
        st.dictionaries(st.text(), st.integers()),
    )
)
def test_a_summary_without_a_room_is_invalid_not_a_crash(answer: Any) -> None:
    with pytest.raises(InvalidPeekResponse):
        check_summary(answer)


def _member(user: str, membership: str, sender: str, reason: str | None = None) -> dict[str, Any]:
    content = {"membership": membership} | ({"reason": reason} if reason else {})
    return {"type": "m.room.member", "state_key": user, "sender": sender, "content": content}


def test_a_kick_or_ban_of_the_observer_says_who_and_why() -> None:
    kick = _member(OBSERVER, "leave", "@mod:hs-alpha.test", "spam")
    ban = _member(OBSERVER, "ban", "@mod:hs-alpha.test")
    assert observer_removed_reason([kick], OBSERVER) == (
        "the observer was removed (leave by @mod:hs-alpha.test: spam)"
    )
    assert observer_removed_reason([ban], OBSERVER) == (
        "the observer was removed (ban by @mod:hs-alpha.test)"
    )
    # Only the observer's newest membership counts; other members and other events do not.
    assert observer_removed_reason([kick, _member(OBSERVER, "join", OBSERVER)], OBSERVER) is None
    assert (
        observer_removed_reason([_member("@bob:hs-alpha.test", "ban", "@mod:x")], OBSERVER) is None
    )
    assert observer_removed_reason([{"type": "m.room.message", "content": []}], OBSERVER) is None
    odd = {"type": "m.room.member", "state_key": OBSERVER, "content": "leave"}
    assert observer_removed_reason([odd], OBSERVER) == "the observer was removed (None by None)"


def test_an_acl_that_denies_us_ends_the_following() -> None:
    def acl(content: Any) -> dict[str, Any]:
        return {"type": "m.room.server_acl", "state_key": "", "content": content}

    deny = acl({"allow": ["*"], "deny": ["*.test"]})
    assert acl_denial_reason([deny], OURS) == f"the room's server ACL denies {OURS}"
    assert acl_denial_reason([deny], "observer.org:8448") is None
    assert acl_denial_reason([deny, acl({"allow": ["*"]})], OURS) is None  # the newest counts
    assert acl_denial_reason([acl("garbage")], OURS) is not None  # no allow: nobody
    assert acl_denial_reason([{**deny, "state_key": "x"}], OURS) is None


def test_a_room_whose_join_was_undone_is_held_longer_each_time() -> None:
    holds = JoinHolds()
    first = holds.undone("!r:a.test", "a.test: not world_readable", 403, 0, 0.5)
    assert first == 600_000  # 10 min (draw 0.5: no jitter)
    assert holds.held("!r:a.test", 1) == (
        403,
        "a.test: not world_readable; the observer does not join it again for 10 min",
    )
    assert holds.held("!other:a.test", 1) is None
    assert holds.held("!r:a.test", first) is None  # ran out
    assert holds.undone("!r:a.test", "again", 502, first, 0.5) == first + 1_200_000  # doubled
    holds.joined("!r:a.test")
    assert holds.undone("!r:a.test", "afresh", 502, 0, 0.5) == 600_000
    for n in range(MAX_HELD_ROOMS + 5):  # bounded
        holds.undone(f"!{n}:a.test", "x", 502, 0, 0.5)
    assert holds.held("!0:a.test", 1) is None and holds.held("!9:a.test", 1) is not None

"""The pure rules of what a room member answers from stored events (core/member_reads.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from peekproxy.core.member_reads import (
    BACKFILL_MAX,
    MISSING_EVENTS_MAX,
    auth_chain_ids,
    backfill_ids,
    federation_pdu,
    host_in_room,
    missing_event_ids,
    state_before,
)
from peekproxy.core.room_versions import room_version


def _event(
    depth: int,
    prevs: list[str],
    *,
    auth: list[str] | None = None,
    type: str = "m.room.message",
    state_key: str | None = None,
) -> dict[str, Any]:
    pdu: dict[str, Any] = {
        "type": type,
        "depth": depth,
        "prev_events": prevs,
        "auth_events": auth or [],
        "content": {"body": "x"},
        "sender": "@a:x",
    }
    if state_key is not None:
        pdu["state_key"] = state_key
    return pdu


def _chain(n: int) -> dict[str, dict[str, Any]]:
    """$1 ← $2 ← … ← $n, a linear room."""
    return {f"${i}": _event(i, [f"${i - 1}"] if i > 1 else []) for i in range(1, n + 1)}


def _lookup(events: Mapping[str, Mapping[str, Any]]) -> Any:
    return events.get


def test_host_in_room_needs_a_joined_member_of_exactly_that_server() -> None:
    members = [("@a:one.test", "join"), ("@b:two.test:8448", "leave"), ("@c:two.test", "invite")]
    assert host_in_room(members, "one.test")
    assert not host_in_room(members, "two.test:8448")  # left
    assert not host_in_room(members, "two.test")  # only invited
    assert not host_in_room(members, "one.test:8448")  # the port is part of the name
    assert not host_in_room([], "one.test")


def test_federation_pdu_as_stored_redacted_and_event_id_by_version() -> None:
    pdu = {
        "event_id": "$old:x",
        "type": "m.room.message",
        "content": {"body": "secret"},
        "unsigned": {"age_ts": 5, "replaces_state": "$evil"},
        "depth": 3,
        "signatures": {},
    }
    v10 = federation_pdu(pdu, redacted=False, rules=room_version("10"))
    assert "event_id" not in v10 and "unsigned" not in v10 and v10["content"]["body"] == "secret"
    v1 = federation_pdu(pdu, redacted=False, rules=room_version("1"))
    assert v1["event_id"] == "$old:x"
    redacted = federation_pdu(pdu, redacted=True, rules=room_version("10"))
    assert redacted["content"] == {} and redacted["depth"] == 3 and "unsigned" not in redacted
    assert pdu["content"] == {"body": "secret"} and "unsigned" in pdu  # not modified


def test_backfill_newest_first_including_the_start() -> None:
    events = _chain(10)
    assert backfill_ids(["$7"], 3, _lookup(events)) == ["$7", "$6", "$5"]
    assert backfill_ids(["$2"], 50, _lookup(events)) == ["$2", "$1"]
    assert backfill_ids(["$nope"], 5, _lookup(events)) == []
    assert backfill_ids(["$3", "$nope", "$3"], 0, _lookup(events)) == ["$3"]  # at least 1


def test_backfill_follows_forks_by_depth_and_stops_at_what_is_not_stored() -> None:
    events = _chain(3)
    events["$a"] = _event(4, ["$3"])
    events["$b"] = _event(5, ["$a"])
    events["$c"] = _event(4, ["$3"])
    events["$m"] = _event(6, ["$b", "$c"])
    assert backfill_ids(["$m"], 10, _lookup(events)) == ["$m", "$b", "$a", "$c", "$3", "$2", "$1"]
    del events["$a"]  # not stored: $b's history through it is not reached that way
    assert backfill_ids(["$b"], 10, _lookup(events)) == ["$b"]


def test_backfill_is_capped() -> None:
    events = _chain(BACKFILL_MAX + 20)
    found = backfill_ids([f"${BACKFILL_MAX + 20}"], 10_000, _lookup(events))
    assert len(found) == BACKFILL_MAX


def test_missing_events_oldest_first_between_earliest_and_latest() -> None:
    events = _chain(10)
    lookup = _lookup(events)
    assert missing_event_ids(["$4"], ["$8"], 10, 0, lookup) == ["$5", "$6", "$7"]
    assert missing_event_ids([], ["$8"], 3, 0, lookup) == ["$5", "$6", "$7"]  # nearest latest
    assert missing_event_ids([], ["$8"], 10, 6, lookup) == ["$6", "$7"]  # min_depth
    assert missing_event_ids([], ["$nope"], 10, 0, lookup) == []
    assert missing_event_ids(["$8"], ["$8"], 10, 0, lookup) == []  # latest already known
    many = missing_event_ids([], ["$50"], 1000, 0, _lookup(_chain(50)))
    assert len(many) == MISSING_EVENTS_MAX


def test_missing_events_over_a_fork_excludes_the_latest_events() -> None:
    events = _chain(3)
    events["$a"] = _event(4, ["$3"])
    events["$b"] = _event(4, ["$3"])
    events["$m"] = _event(5, ["$a", "$b"])
    found = missing_event_ids(["$2"], ["$m", "$a"], 10, 0, _lookup(events))
    assert found[0] == "$3" and set(found) == {"$3", "$b"}


@given(st.integers(2, 40), st.integers(1, 40), st.integers(1, 30), st.integers(0, 40))
def test_missing_events_properties(n: int, latest: int, limit: int, min_depth: int) -> None:
    latest = min(latest, n)
    events = _chain(n)
    found = missing_event_ids([], [f"${latest}"], limit, min_depth, _lookup(events))
    depths = [events[e]["depth"] for e in found]
    assert depths == sorted(depths) and len(found) <= min(limit, MISSING_EVENTS_MAX)
    assert all(min_depth <= d < latest for d in depths)
    if depths:  # contiguous, ending right before latest
        assert depths == list(range(depths[0], latest))


def test_auth_chain_closure_and_missing() -> None:
    events = {
        "$create": _event(1, [], type="m.room.create", state_key=""),
        "$alice": _event(2, ["$create"], auth=["$create"], type="m.room.member", state_key="@a"),
        "$pl": _event(3, ["$alice"], auth=["$create", "$alice"], type="m.room.power_levels"),
        "$msg": _event(4, ["$pl"], auth=["$create", "$alice", "$pl", "$gone"]),
    }
    chain, missing = auth_chain_ids(["$msg"], _lookup(events))
    assert set(chain) == {"$create", "$alice", "$pl"} and missing == {"$gone"}
    chain, missing = auth_chain_ids(["$create", "$alice", "$pl"], _lookup(events))
    assert set(chain) == {"$create", "$alice"} and not missing  # given ones only when reached


def _room() -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], str]]:
    events = {
        "$create": _event(1, [], type="m.room.create", state_key=""),
        "$alice": _event(2, ["$create"], auth=["$create"], type="m.room.member", state_key="@a"),
        "$pl": _event(3, ["$alice"], auth=["$create", "$alice"], type="m.room.power_levels",
                      state_key=""),
        "$leave": _event(4, ["$pl"], auth=["$create", "$pl"], type="m.room.member",
                         state_key="@o"),
        "$join": _event(5, ["$leave"], auth=["$create", "$pl", "$leave"], type="m.room.member",
                        state_key="@o"),
        "$msg": _event(6, ["$join"], auth=["$create", "$pl", "$alice"]),
        "$topic": _event(7, ["$msg"], auth=["$create", "$pl", "$alice"], type="m.room.topic",
                         state_key=""),
    }  # fmt: skip
    current = {
        ("m.room.create", ""): "$create",
        ("m.room.member", "@a"): "$alice",
        ("m.room.power_levels", ""): "$pl",
        ("m.room.member", "@o"): "$join",
    }
    return events, current


def test_state_before_a_message_is_the_current_state_when_nothing_followed() -> None:
    events, current = _room()
    lookup = _lookup(events)
    args: dict[str, Any] = {"later_complete": True, "current": current, "lookup": lookup}
    assert state_before("$msg", events["$msg"], later=[], **args) == current
    assert state_before("$msg", events["$msg"], later=[events["$msg"]], **args) == current
    # Not on the stream, a capped read, a gap or a state event after it: not known.
    assert state_before("$msg", events["$msg"], later=None, **args) is None
    assert (
        state_before("$msg", events["$msg"], later=[], later_complete=False, current=current,
                     lookup=lookup) is None
    )  # fmt: skip
    assert state_before("$msg", events["$msg"], later=[None], **args) is None
    assert state_before("$msg", events["$msg"], later=[events["$topic"]], **args) is None


def test_state_before_a_member_event_puts_back_its_previous_membership() -> None:
    events, current = _room()
    args: dict[str, Any] = {"later_complete": True, "current": current, "lookup": events.get}
    before = state_before("$join", events["$join"], later=[events["$msg"]], **args)
    assert before == {**current, ("m.room.member", "@o"): "$leave"}
    # The first membership of the user (no earlier member event in its auth events): removed.
    before_leave = state_before(
        "$leave",
        events["$leave"],
        later=[],
        later_complete=True,
        current={**current, ("m.room.member", "@o"): "$leave"},
        lookup=events.get,
    )
    assert before_leave is not None and ("m.room.member", "@o") not in before_leave
    # An event that does not hold its key in the current state: not known.
    assert state_before("$leave", events["$leave"], later=[], **args) is None
    # An auth event that is not stored: the previous holder cannot be told.
    del events["$leave"]
    assert state_before("$join", events["$join"], later=[], **args) is None


def test_state_before_other_state_types() -> None:
    events, current = _room()
    with_topic = {**current, ("m.room.topic", ""): "$topic"}
    # A topic's previous holder is not in its auth events: not known.
    assert (
        state_before("$topic", events["$topic"], later=[], later_complete=True,
                     current=with_topic, lookup=events.get) is None
    )  # fmt: skip
    assert (
        state_before("$create", events["$create"], later=[], later_complete=True,
                     current={("m.room.create", ""): "$create"}, lookup=events.get) == {}
    )  # fmt: skip

"""Illegal events in the testbed's room model (:meth:`TestbedRoom.send_illegal`,
:func:`peekproxy.testbed.illegal.make_illegal`): signed like any other event, judged by
peekproxy's own auth rules, in the DAG but never in the state."""

from __future__ import annotations

import json
from typing import Any

import pytest
from signedjson.key import generate_signing_key, get_verify_key

from peekproxy.core.auth_rules import check_event_auth, create_event_id
from peekproxy.core.events import compute_event_id
from peekproxy.core.pdu import check_pdu
from peekproxy.core.pdu_signatures import VerifyKeyInfo, key_table
from peekproxy.testbed.illegal import ILLEGAL_KINDS, make_illegal
from peekproxy.testbed.rooms import RoomError, TestbedRoom

SERVER = "hs.test"
ALICE = f"@alice:{SERVER}"
BOB = f"@bob:{SERVER}"
MALLORY = f"@mallory:{SERVER}"
KEY = generate_signing_key("tb1")
KEYS = key_table({(SERVER, f"{KEY.alg}:{KEY.version}"): VerifyKeyInfo(get_verify_key(KEY))})
T0 = 1_700_000_000_000
VERSIONS = ["10", "11", "12"]


def _room(version: str) -> TestbedRoom:
    room = TestbedRoom.create(
        server_name=SERVER, signing_key=KEY, room_version=version, creator=ALICE, now_ms=T0
    )
    room.join(KEY, BOB, T0 + 1)
    return room


def _message(room: TestbedRoom, body: str, now_ms: int) -> str:
    event_id, _ = room.send(
        KEY, sender=ALICE, type="m.room.message", content={"body": body}, now_ms=now_ms
    )
    return event_id


def _kinds(version: str) -> list[tuple[str, str]]:
    kinds = [("non_member_message", MALLORY), ("power_levels", BOB), ("ban", BOB)]
    return kinds + ([("cites_create", ALICE)] if version == "12" else [])


def _cited(room: TestbedRoom, pdu: dict[str, Any]) -> dict[str, Any]:
    cited = {ref: room.event(ref) for ref in pdu["auth_events"]}
    if room.rules.identifier == "12":
        cited[create_event_id(room.room_id)] = room.events[0]
    return cited


@pytest.mark.parametrize("version", VERSIONS)
def test_illegal_events_enter_the_dag_but_not_the_state(version: str) -> None:
    room = _room(version)
    state_before = room.current_state()
    legal = [_message(room, "m0", T0 + 2)]
    illegal = []
    for number, (kind, sender) in enumerate(_kinds(version)):
        event_id, pdu, reason = make_illegal(
            room, KEY, kind=kind, sender=sender, target=None, now_ms=T0 + 10 + number
        )
        illegal.append(event_id)
        assert reason and room.rejected[event_id] == reason
        # Steps 1-3 pass (hashes, signature): only the auth rules can catch it ...
        verdict = check_pdu(pdu, room.rules, KEYS)
        assert verdict.outcome == "accept" and verdict.event_id == event_id, verdict
        # ... and they do, with the event's own auth events (step 4).
        assert check_event_auth(event_id, pdu, _cited(room, pdu), room.rules) is not None
        assert room.latest()[0] == legal[-1]  # never the latest (accepted) event
        # The next legal event names the illegal one and the newest legal one.
        next_id, next_pdu = room.send(
            KEY, sender=ALICE, type="m.room.message", content={"body": kind}, now_ms=T0 + 20
        )
        assert next_pdu["prev_events"] == [event_id, legal[-1]]
        assert event_id not in next_pdu["auth_events"]
        legal.append(next_id)
    assert room.current_state() == state_before  # no PL change, no ban
    assert room.membership(ALICE) == "join"
    assert set(illegal) <= set(room.event_ids)
    # Served by /backfill and /get_missing_events like the others.
    back = room.backfill([legal[-1]], 100)
    assert {compute_event_id(p, room.rules) for p in back} >= set(illegal)
    missing = room.missing_events([legal[0]], [legal[-1]], 100, 0)
    assert set(illegal) <= {compute_event_id(p, room.rules) for p in missing}
    # Saved and loaded: still rejected, still out of the state.
    loaded = TestbedRoom.from_json(json.loads(json.dumps(room.to_json())), signing_key=KEY)
    assert loaded.rejected == room.rejected
    assert loaded.current_state() == room.current_state()
    assert loaded.latest() == room.latest()


@pytest.mark.parametrize("version", VERSIONS)
def test_legal_events_are_not_made_as_illegal(version: str) -> None:
    room = _room(version)
    count = len(room.events)
    with pytest.raises(RoomError, match="allow this event"):  # alice may ban
        make_illegal(room, KEY, kind="ban", sender=ALICE, target=BOB, now_ms=T0 + 2)
    with pytest.raises(RoomError, match="allow this event"):  # bob is a member
        make_illegal(room, KEY, kind="non_member_message", sender=BOB, target=None, now_ms=T0)
    with pytest.raises(RoomError, match="unknown kind"):
        make_illegal(room, KEY, kind="nonsense", sender=BOB, target=None, now_ms=T0)
    with pytest.raises(RoomError, match="'target' is for kind 'ban'"):
        make_illegal(room, KEY, kind="power_levels", sender=BOB, target=ALICE, now_ms=T0)
    if version != "12":
        with pytest.raises(RoomError, match="version 12"):
            make_illegal(room, KEY, kind="cites_create", sender=ALICE, target=None, now_ms=T0)
    assert len(room.events) == count and not room.rejected


def test_every_kind_is_documented() -> None:
    assert set(ILLEGAL_KINDS) == {"non_member_message", "power_levels", "ban", "cites_create"}

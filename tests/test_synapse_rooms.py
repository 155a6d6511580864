"""Real Synapse rooms of every room version pass peekproxy's checks on receipt of a PDU (SSAPI
§Checks performed on receipt of a PDU), agreeing with Synapse's own verdicts.

The rooms are ``tests/fixtures/synapse-rooms/vN.json``, made by two real Synapses (A holds the
room, B has remote members) through ``make_fixtures.py`` in that folder (docs/testing.md): joins
local and remote, leaves, an invite, a kick, a ban and an unban, power-level promotions and
demotions, join-rule changes (invite; knock v7+, restricted v8+, knock_restricted v10+, with
joins through them), topic and name changes, messages and redactions of a message and of a
state event; v1-5 also m.room.aliases from both servers. Each event carries A's verdict
(``rejections``, ``soft_failed``) and B's.

* steps 1-3 (:func:`peekproxy.core.pdu.check_pdu`): every event is accepted, with its event ID;
* step 4 (:func:`peekproxy.core.auth_rules.check_event_auth`): judged by its own auth events,
  taken from the same fixture (v12: the create event under ``create_event_id(room_id)``);
* step 5 (:func:`peekproxy.core.auth_rules.check_against_state`): judged by the state before
  it, folded over the fixture's order (the rooms are linear; :func:`test_fixture_contents`
  checks that, and that no regeneration lost a kind of event the issue names).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from peekproxy.core.auth_rules import (
    StateKey,
    check_against_state,
    check_event_auth,
    create_event_id,
)
from peekproxy.core.pdu import check_pdu
from peekproxy.core.pdu_signatures import KeyLookup, VerifyKeyInfo, key_table
from peekproxy.core.room_versions import RoomVersion, room_version

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "synapse-rooms"
VERSIONS = [str(n) for n in range(1, 13)]


@dataclass(frozen=True)
class Event:
    """One event of a fixture: its ID, PDU, note and Synapse A's verdict."""

    event_id: str
    pdu: Mapping[str, Any]
    note: str
    rejected: str | None
    soft_failed: bool

    @property
    def state_key(self) -> StateKey | None:
        """(type, state_key) for a state event, else ``None``."""
        key = self.pdu.get("state_key")
        return (self.pdu["type"], key) if isinstance(key, str) else None


@dataclass(frozen=True)
class Room:
    """A fixture: the room, its version's rules, the servers' keys and the events in order."""

    room_id: str
    rules: RoomVersion
    keys: KeyLookup
    servers: Mapping[str, str]
    events: tuple[Event, ...]


@cache
def load(version: str) -> Room:
    """Read ``vN.json``; the keys are every verify key of every server's key document."""
    data = json.loads((FIXTURES / f"v{version}.json").read_text("utf-8"))
    keys = {
        (server, key_id): VerifyKeyInfo.from_base64(key["key"])
        for server, document in data["server_keys"].items()
        for key_id, key in document["verify_keys"].items()
    }
    events = tuple(
        Event(
            e["event_id"],
            e["pdu"],
            e["note"],
            e["synapse"]["rejected"],
            e["synapse"]["soft_failed"],
        )
        for e in data["events"]
    )
    assert data["room_version"] == version
    return Room(data["room_id"], room_version(version), key_table(keys), data["servers"], events)


def _ids(references: list[Any]) -> list[str]:
    """Event IDs of ``prev_events``/``auth_events`` (v1/v2: ``[id, hashes]`` pairs)."""
    return [r if isinstance(r, str) else r[0] for r in references]


def _redacted_id(pdu: Mapping[str, Any]) -> str:
    """The ID a redaction redacts (v11+: ``content.redacts``; before: top-level)."""
    redacts: str = pdu.get("redacts") or pdu["content"]["redacts"]
    return redacts


@pytest.mark.parametrize("version", VERSIONS)
def test_steps_1_to_3(version: str) -> None:
    """Format, signatures (one or two servers), content hash and event ID: every event passes."""
    room = load(version)
    for event in room.events:
        verdict = check_pdu(event.pdu, room.rules, room.keys)
        assert (verdict.outcome, verdict.reason) == ("accept", "ok"), event.note
        assert verdict.event_id == event.event_id, event.note


@pytest.mark.parametrize("version", VERSIONS)
def test_auth_rules_agree_with_synapse(version: str) -> None:
    """Steps 4 and 5: every event Synapse accepted is allowed by its auth events and by the
    state before it; an event Synapse rejected fails one of them; a soft-failed one passes
    step 4 and fails against the state (the current state, in a linear room)."""
    room = load(version)
    by_id = {event.event_id: event.pdu for event in room.events}
    create = next(e.pdu for e in room.events if e.pdu["type"] == "m.room.create")
    auth_events = {**by_id, create_event_id(room.room_id): create}
    rejected = {event.event_id for event in room.events if event.rejected}
    state: dict[StateKey, Mapping[str, Any]] = {}
    for event in room.events:
        step4 = check_event_auth(
            event.event_id, event.pdu, auth_events, room.rules, rejected=rejected
        )
        step5 = check_against_state(event.event_id, event.pdu, state, room.rules)
        if event.rejected:
            assert (step4, step5) != (None, None), (event.note, event.rejected)
            continue
        assert step4 is None, (event.note, step4)
        if event.soft_failed:
            assert step5 is not None, event.note
            continue
        assert step5 is None, (event.note, step5)
        if event.state_key is not None:
            state[event.state_key] = event.pdu


def _memberships(room: Room) -> Iterator[tuple[Event, str | None, str]]:
    """(member event, the target's membership before it, after it) in order."""
    current: dict[str, str] = {}
    for event in room.events:
        if event.pdu["type"] == "m.room.member":
            target = event.pdu["state_key"]
            after = event.pdu["content"]["membership"]
            yield event, current.get(target), after
            current[target] = after


def _power_changes(room: Room) -> Iterator[tuple[int, int]]:
    """(level before, level after) of every user whose level a power-levels event changed."""
    previous: Mapping[str, Any] | None = None
    for event in room.events:
        if event.pdu["type"] != "m.room.power_levels":
            continue
        users = event.pdu["content"].get("users", {})
        if previous is not None:
            default = event.pdu["content"].get("users_default", 0)
            for user in set(users) | set(previous):
                before, after = previous.get(user, default), users.get(user, default)
                if before != after:
                    yield int(before), int(after)
        previous = users


@pytest.mark.parametrize("version", VERSIONS)
def test_fixture_contents(version: str) -> None:
    """What the issue names is in every room, so a regenerated fixture cannot silently lose
    it; and the room is linear (each event's only prev_event is the one before it), which
    makes the fixture's order the order of the state before each event."""
    room = load(version)
    auth = room.rules.auth
    for before, event in zip(room.events, room.events[1:], strict=False):
        assert _ids(event.pdu["prev_events"]) == [before.event_id], event.note

    transitions: Counter[tuple[str | None, str, bool]] = Counter()
    restricted_joins = 0
    for event, was, now in _memberships(room):
        transitions[(was, now, event.pdu["sender"] == event.pdu["state_key"])] += 1
        if now == "join" and "join_authorised_via_users_server" in event.pdu["content"]:
            restricted_joins += 1
    assert transitions[("leave", "join", True)] + transitions[(None, "join", True)] >= 4
    assert transitions[("join", "leave", True)] >= 2  # leaves
    assert transitions[("join", "leave", False)] >= 1  # a kick
    assert transitions[("join", "ban", False)] >= 1
    assert transitions[("ban", "leave", False)] >= 1  # an unban
    assert transitions[("invite", "join", True)] >= 2
    assert (transitions[("leave", "knock", True)] >= 1) == auth.knock_join_rule
    assert (restricted_joins >= 2) == auth.restricted_join_rule

    changes = list(_power_changes(room))
    assert any(after > before for before, after in changes), "a promotion"
    assert any(after < before for before, after in changes), "a demotion"

    join_rules = [
        e.pdu["content"]["join_rule"]
        for e in room.events
        if e.state_key == ("m.room.join_rules", "")
    ]
    assert join_rules[:2] == ["public", "invite"]
    assert ("knock" in join_rules) == auth.knock_join_rule
    assert ("restricted" in join_rules) == auth.restricted_join_rule
    assert ("knock_restricted" in join_rules) == auth.knock_restricted_join_rule

    by_id = {event.event_id: event for event in room.events}
    redacted = [
        by_id[_redacted_id(e.pdu)] for e in room.events if e.pdu["type"] == "m.room.redaction"
    ]
    assert any(e.pdu["type"] == "m.room.message" for e in redacted)
    assert any(e.state_key is not None for e in redacted)

    types = Counter(event.pdu["type"] for event in room.events)
    assert types["m.room.topic"] >= 2 and types["m.room.name"] >= 2
    assert types["m.room.message"] >= 5
    # v1-5: m.room.aliases (Synapse no longer sends it itself; the script has a PL-0 member
    # send one, allowed only by the aliases special case, and a remote member another).
    aliases = [e for e in room.events if e.pdu["type"] == "m.room.aliases"]
    assert (len(aliases) == 2) == auth.special_case_aliases_auth
    assert not aliases or {e.pdu["state_key"] for e in aliases} == set(room.servers.values())
    # Both servers sent events, and some carry two servers' signatures (send_join, invites).
    senders = {event.pdu["sender"].split(":", 1)[1] for event in room.events}
    assert senders == set(room.servers.values())
    assert any(len(event.pdu["signatures"]) == 2 for event in room.events)

"""Differential tests: peekproxy's authorization rules against Synapse's (issue 14).

Hypothesis generates rooms of every version 1-12 as sequences of events from five users on
four servers, legal and illegal: membership changes (join, leave, invite, ban, kick, knock,
restricted joins), power levels (odd values: strings, booleans, floats, ``null``, bad
``users`` keys, v12 creators listed), join rules, aliases, redactions, third-party invites,
messages and other state, second create events, and wrong ``auth_events`` selections
(missing, duplicated, unexpected, stale, rejected; v12 citing the create event). Each event
is judged by peekproxy (step 1, then ``check_event_auth`` with its auth events and
``check_against_state`` with the room's current state) and by Synapse (``auth_oracle``);
the verdicts must be equal (Synapse's reject, parse refusal and crash all count as "not
accepted").

A room's events go to the oracle pipelined and its answers are compared at the end of the
room; the verdict fed back into the room (a rejected event is rejected for both, later
events citing it are judged so) is therefore peekproxy's, which equals Synapse's up to the
first disagreement, the one reported.

A step is a tuple of small integers that :class:`Choices` turns into choices (0 is the
ordinary one, so shrinking leads to ordinary events). Set ``PEEKPROXY_AUTH_REGRESSIONS_OUT``
to a directory to have a disagreement written there as a regression case for
tests/fixtures/auth-regressions/ (replayed by tests/test_auth_rules.py).
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from signedjson.sign import sign_json

from peekproxy.core.auth_rules import StateKey, check_event_auth
from tests import auth_rooms, test_auth_rules
from tests.auth_rooms import (
    ALICE,
    BOB,
    CAROL,
    DAVE,
    IDENTITY_KEYS,
    IDENTITY_PUBLIC_KEYS,
    MALLORY,
    Room,
    load_regressions,
    opening,
    regression_case,
)
from tests.synapse_oracle import AuthOracle, judge_request

VERSIONS = [str(v) for v in range(1, 13)]
#: Per room version; 12 x 850 = 10,200 generated events per run at least.
MIN_EVENTS_PER_VERSION = 850
ROOMS_PER_VERSION = 32
STEPS = st.lists(st.tuples(*[st.integers(0, 255)] * 7), min_size=28, max_size=45)

USERS = [ALICE, BOB, CAROL, DAVE, MALLORY]
KEYS = IDENTITY_KEYS
PUBLIC_KEYS = IDENTITY_PUBLIC_KEYS

#: Levels, legal first. Strings, booleans and floats are levels for Python's int()
#: (v1-v9, as Synapse reads them); v10+ refuses them; floats are invalid JSON from v6.
LEVELS: list[Any] = [
    0,
    50,
    100,
    75,
    0,
    50,
    100,
    -1,
    101,
    1,
    "50",
    " 75 ",
    "+100",
    "5_0",
    "abc",
    "",
    True,
    False,
    None,
    50.0,
    99.9,
    [1],
    {},
]
NAMED = ["users_default", "events_default", "state_default", "ban", "kick", "redact", "invite"]
JOIN_RULES: list[Any] = [
    "public",
    "invite",
    "knock",
    "restricted",
    "knock_restricted",
    "restricted",
    "knock",
    "private",
    5,
]
STEP_KINDS = (
    ["message"] * 3
    + ["member"] * 7
    + ["power_levels"] * 4
    + ["join_rules", "aliases", "redaction", "third_party", "third_party", "state"]
    + ["join_rules", "third_party", "message", "member", "power_levels", "create"]
    + ["odd", "odd"]
)
MUTATIONS = ["drop", "dup", "extra", "stale", "rejected", "create"]

T = TypeVar("T")
Step = dict[str, Any]


class Choices:
    """Hands out a step's integers as choices."""

    def __init__(self, numbers: tuple[int, ...]) -> None:
        self._numbers = list(numbers)

    def number(self) -> int:
        return self._numbers.pop(0) if self._numbers else 0

    def pick(self, options: list[T]) -> T:
        return options[self.number() % len(options)]

    def one_in(self, n: int) -> bool:
        return self.number() % n == n - 1


def joined(room: Room) -> list[str]:
    return sorted(
        k[1]
        for k, i in room.state.items()
        if k[0] == "m.room.member" and room.events[i]["content"].get("membership") == "join"
    )


def sender_of(c: Choices, room: Room) -> str:
    """Three times in four a joined user, so that more events get past 'not in room'."""
    members = joined(room)
    return c.pick(members) if members and not c.one_in(4) else c.pick(USERS)


def power_levels_step(c: Choices, room: Room) -> Step:
    """The current power levels changed in one or two places, mostly by the creator."""
    current = room.state.get(("m.room.power_levels", ""))
    content: dict[str, Any] = copy.deepcopy(room.events[current]["content"]) if current else {}
    for _ in range(1 + c.number() % 2):
        where = c.pick(["users", "named", "users", "events", "notifications", "drop"])
        level = c.pick(LEVELS)
        target = (
            content.setdefault(where, {}) if where in ("users", "events", "notifications") else None
        )
        if where == "users" and isinstance(target, dict):
            target[c.pick([*USERS, "notauser", "@nocolon"])] = level
        elif where in ("events", "notifications") and isinstance(target, dict):
            target[c.pick(["m.room.name", "m.room.power_levels", "room", "m.room.message"])] = level
        elif where == "named":
            content[c.pick(NAMED)] = level
        elif content:
            content.pop(c.pick(sorted(content)))
    sender = ALICE if c.number() % 3 else sender_of(c, room)
    state_key = None if c.one_in(12) else ""
    return {
        "etype": "m.room.power_levels",
        "sender": sender,
        "content": content,
        "state_key": state_key,
    }


def membership_step(c: Choices, room: Room) -> Step:
    membership = c.pick(["join", "leave", "invite", "ban", "knock", "join", "leave", "odd"])
    sender = c.pick(USERS) if membership in ("join", "knock") else sender_of(c, room)
    target = sender if membership in ("join", "knock") and not c.one_in(8) else c.pick(USERS)
    if membership == "leave" and c.one_in(2):
        target = sender
    content: dict[str, Any] = {"membership": membership}
    if membership == "odd":
        content = c.pick([{}, {"membership": "private"}, {"membership": 5}])
    step: Step = {
        "etype": "m.room.member",
        "sender": sender,
        "content": content,
        "state_key": target,
    }
    if membership == "join" and not c.one_in(3):
        members = joined(room) or USERS
        content["join_authorised_via_users_server"] = c.pick([*members, "notauser", MALLORY])
    if membership == "join" and c.one_in(12):
        step["prev"] = [room.create_id]  # a creator's first join, or not
    return step


def third_party_invite_step(c: Choices, room: Room) -> Step:
    token = c.pick(["tok1", "tok2"])
    sender = ALICE if c.number() % 3 else sender_of(c, room)
    if c.one_in(2):  # the m.room.third_party_invite event
        content: dict[str, Any] = {"display_name": "x", "key_validity_url": "https://id.test/"}
        key = c.number() % 3
        if key < 2:
            content["public_key"] = PUBLIC_KEYS[key]
        if c.one_in(2):
            content["public_keys"] = [{"public_key": PUBLIC_KEYS[(key + 1) % 2]}]
        return {
            "etype": "m.room.third_party_invite",
            "sender": sender,
            "content": content,
            "state_key": token,
        }
    target = c.pick(USERS)
    mxid = MALLORY if c.one_in(6) else target
    signed = sign_json({"mxid": mxid, "token": token}, "id.test", KEYS[c.number() % 2])
    third_party: dict[str, Any] = {"display_name": "x", "signed": signed}
    tamper = c.pick(["none", "none", "none", "token", "drop_signed", "no_token"])
    if tamper == "token":
        signed["token"] = "tok1" if token == "tok2" else "tok2"
    elif tamper == "drop_signed":
        del third_party["signed"]
    elif tamper == "no_token":
        del signed["token"]
    return {
        "etype": "m.room.member",
        "sender": sender,
        "state_key": target,
        "content": {"membership": "invite", "third_party_invite": third_party},
    }


def redaction_step(c: Choices, room: Room) -> Step:
    known = sorted(room.events) + sorted(room.rejected)
    target: Any = c.pick([*known, "$x:b.test", "$x:m.test", 5, "$nocolon"])
    step: Step = {
        "etype": "m.room.redaction",
        "sender": sender_of(c, room),
        "content": {},
        "extra": {"redacts": target},
    }
    if room.rules.redaction.keep_redaction_redacts:
        step["content"] = {"redacts": target}
    if room.v1_ids:
        step["id_server"] = c.pick(["a.test", "b.test", "m.test"])
    return step


#: Malformed contents, as (type, content, state_key); "$sender" is replaced by the sender.
ODD_EVENTS: list[tuple[str, Any, str | None]] = [
    ("m.room.join_rules", {}, ""),
    ("m.room.join_rules", {"join_rule": None}, ""),
    ("m.room.join_rules", {"join_rule": ["public"]}, ""),
    ("m.room.member", {"membership": "join", "join_authorised_via_users_server": None}, "$sender"),
    ("m.room.member", {"membership": "join", "join_authorised_via_users_server": 5}, "$sender"),
    ("m.room.member", {"membership": "join", "join_authorised_via_users_server": [1]}, "$sender"),
    ("m.room.member", {"membership": ["join"]}, "$sender"),
    ("m.room.member", {"membership": "invite", "third_party_invite": "x"}, DAVE),
    ("m.room.member", {"membership": "invite", "third_party_invite": {"signed": []}}, DAVE),
    (
        "m.room.member",
        {"membership": "invite", "third_party_invite": {"signed": {"token": 5}}},
        DAVE,
    ),
    (
        "m.room.member",
        {"membership": "invite", "third_party_invite": {"signed": {"token": [5]}}},
        DAVE,
    ),
    (
        "m.room.member",
        {
            "membership": "invite",
            "third_party_invite": {"signed": {"mxid": DAVE, "token": "tok1", "signatures": "x"}},
        },
        DAVE,
    ),
    (
        "m.room.member",
        {
            "membership": "invite",
            "third_party_invite": {
                "signed": {"mxid": DAVE, "token": "tok1", "signatures": {"id": "x"}}
            },
        },
        DAVE,
    ),
    ("m.room.member", {"membership": "join"}, "notauser"),
    ("m.room.member", {"membership": "invite"}, ""),
    ("m.room.power_levels", {"users": []}, ""),
    ("m.room.power_levels", {"users": None}, ""),
    ("m.room.power_levels", {"events": []}, ""),
    ("m.room.power_levels", {"events": {"m.room.name": None}}, ""),
    ("m.room.power_levels", {"users_default": None, "ban": None}, ""),
    ("m.room.power_levels", {"notifications": [], "users": {ALICE: 100}}, ""),
    ("m.room.third_party_invite", {"public_keys": {}}, "tok1"),
    ("m.room.third_party_invite", {"public_keys": 5}, "tok2"),
    ("m.room.third_party_invite", {"public_keys": [5]}, "tok1"),
    ("m.room.third_party_invite", {"public_keys": [{"public_key": "!!"}]}, "tok2"),
    ("m.room.third_party_invite", {"public_keys": [{}], "public_key": PUBLIC_KEYS[0]}, "tok1"),
    ("m.room.third_party_invite", {"public_key": 5}, "tok2"),
    ("m.room.third_party_invite", {}, None),
    ("m.room.aliases", {"aliases": 5}, "$domain"),
    ("m.room.redaction", {"redacts": 5}, None),
    ("m.room.message", {"body": 1.5}, None),
]


def odd_step(c: Choices, room: Room) -> Step:
    """A malformed event (a copy of one of :data:`ODD_EVENTS`)."""
    sender = ALICE if c.one_in(2) else sender_of(c, room)
    etype, content, state_key = c.pick(ODD_EVENTS)
    if state_key == "$sender":
        state_key = sender
    elif state_key == "$domain":
        state_key = sender.split(":", 1)[1]
    return {
        "etype": etype,
        "sender": sender,
        "content": copy.deepcopy(content),
        "state_key": state_key,
    }


def other_step(kind: str, c: Choices, room: Room) -> Step:
    sender = sender_of(c, room)
    if kind == "message":
        return {
            "etype": c.pick(["m.room.message", "m.custom"]),
            "sender": sender,
            "content": {"body": "hi"},
        }
    if kind == "join_rules":
        rule = c.pick(JOIN_RULES)
        content: dict[str, Any] = {"join_rule": rule}
        if rule in ("restricted", "knock_restricted"):
            content["allow"] = [{"type": "m.room_membership", "room_id": "!other:a.test"}]
        return {
            "etype": "m.room.join_rules",
            "sender": ALICE if c.number() % 3 else sender,
            "content": content,
            "state_key": "",
        }
    if kind == "aliases":
        domain = sender.split(":", 1)[1]
        state_key = c.pick([domain, domain, "m.test", "", None])
        return {
            "etype": "m.room.aliases",
            "sender": sender,
            "content": {"aliases": [f"#x:{domain}"]},
            "state_key": state_key,
        }
    if kind == "create":
        return {
            "etype": "m.room.create",
            "sender": sender,
            "state_key": "",
            "content": {"creator": sender, "room_version": room.version},
        }
    etype, state_key = c.pick(
        [
            ("m.room.name", ""),
            ("m.custom.state", sender),
            ("m.custom.state", BOB),
            ("m.custom.state", "@notauser"),
            ("m.room.topic", ""),
        ]
    )
    return {"etype": etype, "sender": sender, "content": {"name": "x"}, "state_key": state_key}


def make_step(numbers: tuple[int, ...], room: Room) -> Step:
    c = Choices(numbers)
    kind = c.pick(STEP_KINDS)
    mutation = c.number()
    if kind == "member":
        step = membership_step(c, room)
    elif kind == "third_party":
        step = third_party_invite_step(c, room)
    elif kind == "power_levels":
        step = power_levels_step(c, room)
    elif kind == "redaction":
        step = redaction_step(c, room)
    elif kind == "odd":
        step = odd_step(c, room)
    else:
        step = other_step(kind, c, room)
    if mutation >= 256 - 2 * len(MUTATIONS) * 2:  # about one step in nine
        mutate_auth(MUTATIONS[mutation % len(MUTATIONS)], c, room, step)
    return step


def mutate_auth(mutation: str, c: Choices, room: Room, step: Step) -> None:
    """A wrong ``auth_events`` selection."""
    content = step["content"] if isinstance(step["content"], dict) else {}
    auth = room.auth_ids(step["etype"], step["sender"], content, step.get("state_key"))
    if mutation == "drop" and auth:
        auth.remove(c.pick(auth))
    elif mutation == "dup" and auth:
        auth.append(c.pick(auth))
    elif mutation == "extra":
        auth.append(c.pick(sorted(room.state.values())))
    elif mutation == "stale":
        auth.append(c.pick(sorted(room.events)))
    elif mutation == "rejected" and room.rejected:
        auth.append(c.pick(sorted(room.rejected)))
    elif mutation == "create":
        if room.create_id in auth:
            auth.remove(room.create_id)
        else:
            auth.append(room.create_id)  # v12: the create event must not be cited
    step["auth"] = auth


def create_content(variant: int, version: str) -> dict[str, Any]:
    """The create event's content: mostly ordinary; rarely no creator or an odd one (v1-v10),
    m.federate false (or not a boolean), or v12 additional creators (valid or not)."""
    rules = Room(version).rules.auth
    content: dict[str, Any] = {"room_version": version}
    if not rules.implicit_room_creator and variant != 255:
        content["creator"] = ALICE
    if variant % 13 == 12:
        content["m.federate"] = False
    if variant % 31 == 30:
        content["m.federate"] = ["false", 0, None, True][variant % 4]
    if variant == 254:  # v1-v10: any JSON value is a creator; v11+: an ignored key
        content["creator"] = 5 if not rules.implicit_room_creator else BOB
    if rules.privileged_creators and variant % 6 == 5:
        creators: list[Any] = [
            [BOB],
            [BOB, DAVE],
            [BOB],
            ["notauser"],
            BOB,
            [5],
            ["@:b.test"],
            ["@d:c.test:99999"],
            ["@d:c..test"],
            ["@d:c.test\n"],
            [BOB] * 2,
        ]
        content["additional_creators"] = creators[variant % len(creators)]
    return content


def start(room: Room, variant: int) -> list[Step]:
    """The usual opening (``opening``); some rooms have Bob at 100, or an invite level of 50."""
    steps = opening(room, {"invite": 50 if variant % 3 == 1 else 0})
    if variant % 5 == 1:
        steps[1]["content"]["users"][BOB] = 100
    return steps


@dataclass
class Judged:
    """One generated event as peekproxy judged it, with what a regression case needs."""

    event_id: str
    pdu: dict[str, Any]
    verdict: str | None
    state: dict[StateKey, str]
    rejected: frozenset[str]


class Differential:
    """Builds a room's events, judges them with peekproxy at once and with Synapse in one
    pipelined batch, then compares."""

    def __init__(self, oracle: AuthOracle) -> None:
        self.oracle = oracle
        self.stats: Counter[str] = Counter()

    def room(self, version: str, variant: int, steps: list[tuple[int, ...]]) -> None:
        room = Room(version, create_content=create_content(variant, version))
        self.oracle.send({"reset": True})
        create_verdict = check_event_auth(room.create_id, room.create, {}, room.rules)
        judged = [Judged(room.create_id, room.create, create_verdict, {}, frozenset())]
        self.oracle.send(judge_request(version, room.create))
        try:
            if create_verdict is None:
                for step in start(room, variant):
                    judged.append(self.judge(room, step))
                for numbers in steps:
                    judged.append(self.judge(room, make_step(numbers, room)))
        finally:  # read every answer sent, even after an error, or later rooms get them
            answers = self.oracle.answers(len(judged) + 1)[1:]
        for entry, answer in zip(judged, answers, strict=True):
            self.compare(room, entry, answer)

    def judge(self, room: Room, step: Step) -> Judged:
        event_id, pdu = room.build_step(step)
        state = dict(room.state)
        rejected = frozenset(room.rejected)
        verdict = room.verdict(event_id, pdu)
        self.oracle.send(judge_request(room.version, pdu, sorted(state.values())))
        room.commit(event_id, pdu, accepted=verdict is None)
        return Judged(event_id, pdu, verdict, state, rejected)

    def compare(self, room: Room, entry: Judged, answer: dict[str, Any]) -> None:
        self.stats["events"] += 1
        self.stats[f"synapse {answer['verdict']}"] += 1
        if (entry.verdict is None) == (answer["verdict"] == "accept"):
            return
        case = regression_case(room, entry.event_id, entry.pdu, entry.state, entry.rejected, answer)
        out = os.environ.get("PEEKPROXY_AUTH_REGRESSIONS_OUT")
        if out:
            name = f"v{room.version}-{entry.pdu['type']}-{entry.event_id[1:9]}.json"
            Path(out, name).write_text(json.dumps(case, indent=1, sort_keys=True) + "\n")
        raise AssertionError(
            f"peekproxy: {entry.verdict or 'accept'}; Synapse: {answer}\n"
            f"case: {json.dumps(case, sort_keys=True)[:4000]}"
        )


@pytest.mark.parametrize("version", VERSIONS)
def test_peekproxy_agrees_with_synapse(auth_oracle: AuthOracle, version: str) -> None:
    """Generated rooms of one version: peekproxy's verdict is Synapse's for every event."""
    differential = Differential(auth_oracle)

    @seed(1000 + int(version))  # reproducible, and different rooms for each version
    @settings(
        max_examples=ROOMS_PER_VERSION,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(variant=st.integers(0, 255), steps=STEPS)
    def one_room(variant: int, steps: list[tuple[int, ...]]) -> None:
        differential.room(version, variant, steps)

    one_room()
    stats = differential.stats
    print(f"v{version}: {dict(sorted(stats.items()))}")
    assert stats["events"] >= MIN_EVENTS_PER_VERSION
    # Both verdicts are common: the rooms are not all trivially legal or illegal.
    assert stats["synapse accept"] > 0.3 * stats["events"]
    assert stats["synapse reject"] + stats["synapse crash"] > 0.2 * stats["events"]


def unit_test_calls() -> list[tuple[str, Callable[..., None], dict[str, Any]]]:
    """Every test of tests/test_auth_rules.py (but the regression replay), with each of
    its parameter combinations."""
    calls = []
    for name, function in vars(test_auth_rules).items():
        if not name.startswith("test_") or name == "test_regression_cases":
            continue
        combinations: list[dict[str, Any]] = [{}]
        for mark in getattr(function, "pytestmark", []):
            if mark.name == "parametrize":
                argnames, values = mark.args[:2]
                if isinstance(argnames, str):
                    argnames = [name.strip() for name in argnames.split(",")]
                rows = [v if len(argnames) > 1 else (v,) for v in values]
                combinations = [
                    {**c, **dict(zip(argnames, row, strict=True))}
                    for c in combinations
                    for row in rows
                ]
        calls += [(name, function, kwargs) for kwargs in combinations]
    return calls


def test_the_unit_tests_rooms_agree_with_synapse(auth_oracle: AuthOracle) -> None:
    """Every verdict the unit tests (tests/test_auth_rules.py) rely on is Synapse's too."""
    recorded: list[Room] = []
    auth_rooms.RECORDED_ROOMS = recorded
    try:
        for _, function, kwargs in unit_test_calls():
            function(**kwargs)
    finally:
        auth_rooms.RECORDED_ROOMS = None
    judged = 0
    for room in recorded:
        auth_oracle.reset()
        for entry in room.judgements:
            answer = auth_oracle.judge(room.version, entry.pdu, entry.state)
            judged += 1
            accepted = answer["verdict"] == "accept"
            assert (entry.verdict is None) == accepted, (
                f"v{room.version} {entry.pdu['type']} {entry.pdu.get('content')}: "
                f"peekproxy {entry.verdict or 'accept'}, Synapse {answer}"
            )
    assert judged > 2000


@pytest.mark.parametrize(
    ("name", "case"), load_regressions(), ids=[n for n, _ in load_regressions()]
)
def test_regression_cases_still_hold_for_synapse(
    auth_oracle: AuthOracle, name: str, case: dict[str, Any]
) -> None:
    """The stored cases' Synapse verdicts are still what the pinned Synapse says."""
    auth_oracle.reset()
    events = case["auth_events"]
    answer = auth_oracle.ask(
        {
            "room_version": case["room_version"],
            "event": case["event"],
            "auth_events": [events[i] for i in sorted(events)],
            "state": [events[i] for i in case["state"]],
        }
    )
    assert answer["verdict"] == case["synapse"]["verdict"], answer

"""The authorization rules of room versions 1-12 (peekproxy.core.auth_rules), rule by rule.

Each test builds one room with :func:`room` (Alice creates it and joins, power levels give
her 100 (v12: the creator's infinite level), public join rules, Bob joins) and sends events
through receipt steps 1 and 4-6 (:meth:`Room.send`: ``None`` = accepted). The verdicts were
checked against Synapse 1.163.2 (tests/test_auth_rules_oracle.py replays the same rooms and
many generated ones); the stored cases in tests/fixtures/auth-regressions/ are replayed at
the end without Synapse.
"""

from __future__ import annotations

from typing import Any

import pytest
from signedjson.sign import sign_json

from peekproxy.core.auth_rules import (
    auth_types_for_event,
    check_against_state,
    check_event_auth,
    create_event_id,
)
from peekproxy.core.events import compute_event_id
from peekproxy.core.room_versions import room_version
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
    replay_regression,
)

VERSIONS = [str(v) for v in range(1, 13)]
IDENTITY_KEY, OTHER_KEY = IDENTITY_KEYS


def room(
    version: str,
    *,
    join_rule: str = "public",
    levels: dict[str, Any] | None = None,
    create_content: dict[str, Any] | None = None,
    bob_joins: bool = True,
) -> Room:
    """Alice's room: she joins, sets power levels (``levels`` overrides) and the join rule;
    Bob joins (when the join rule lets him)."""
    r = Room(version, create_content=create_content)
    for step in opening(r, levels)[: None if bob_joins else -1]:
        assert r.send_step(step) is None
    if join_rule != "public":
        assert r.send("m.room.join_rules", ALICE, {"join_rule": join_rule}, "") is None
    return r


def member(
    r: Room, sender: str, membership: str, target: str | None = None, **content: Any
) -> str | None:
    return r.send("m.room.member", sender, {"membership": membership, **content}, target or sender)


# --- Messages, bans, power levels: the acceptance criteria of issue 14 ----------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_messages_need_a_joined_sender(version: str) -> None:
    r = room(version)
    assert r.send("m.room.message", BOB, {"body": "hi"}) is None
    assert "not joined" in str(r.send("m.room.message", MALLORY, {"body": "hi"}))
    assert member(r, BOB, "leave") is None
    assert "not joined" in str(r.send("m.room.message", BOB, {"body": "gone"}))


@pytest.mark.parametrize("version", VERSIONS)
def test_a_power_level_change_needs_the_power(version: str) -> None:
    r = room(version)
    grab = {"users": {BOB: 100}, "state_default": 50}
    assert "below the level to send" in str(r.send("m.room.power_levels", BOB, grab, ""))
    users = {BOB: 50} if r.rules.auth.privileged_creators else {ALICE: 100, BOB: 50}
    assert r.send("m.room.power_levels", ALICE, {"users": users}, "") is None
    # Bob, at 50 = state_default, still cannot raise himself above his own level.
    assert "above the sender's level" in str(
        r.send("m.room.power_levels", BOB, {"users": {**users, BOB: 100}}, "")
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_bans_need_the_ban_level_and_a_lower_target(version: str) -> None:
    r = room(version)
    assert member(r, CAROL, "join") is None
    assert "below the ban level" in str(member(r, BOB, "ban", CAROL))
    assert member(r, ALICE, "ban", CAROL) is None
    assert "banned" in str(member(r, CAROL, "join"))
    assert "below the ban level (unban)" in str(member(r, BOB, "leave", CAROL))


@pytest.mark.parametrize("version", VERSIONS)
def test_another_user_at_your_level_cannot_be_changed(version: str) -> None:
    r = room(version)
    users = (
        {BOB: 100, CAROL: 100}
        if r.rules.auth.privileged_creators
        else {ALICE: 100, BOB: 100, CAROL: 100}
    )
    assert r.send("m.room.power_levels", ALICE, {"users": users}, "") is None
    assert "equal to the sender's" in str(
        r.send("m.room.power_levels", BOB, {"users": {**users, CAROL: 0}}, "")
    )
    assert r.send("m.room.power_levels", BOB, {"users": {**users, BOB: 0}}, "") is None


# --- Room version 12 (MSC4289, MSC4291) ------------------------------------------------------


def test_v12_events_must_not_cite_the_create_event() -> None:
    r = room("12")
    auth = [*r.auth_ids("m.room.message", BOB, {}, None), r.create_id]
    assert "must not contain the create event" in str(
        r.send("m.room.message", BOB, {"body": "x"}, auth=auth)
    )
    assert r.create_id == create_event_id(str(r.room_id))


def test_v12_creators_outrank_everyone_and_stay_out_of_users() -> None:
    r = room("12", create_content={"room_version": "12", "additional_creators": [DAVE]})
    assert r.send("m.room.power_levels", ALICE, {"users": {BOB: 100}}, "") is None
    assert "not above" in str(member(r, BOB, "ban", ALICE))
    assert "must not be in users" in str(
        r.send("m.room.power_levels", ALICE, {"users": {ALICE: 100}}, "")
    )
    assert "additional creators" in str(
        r.send("m.room.power_levels", ALICE, {"users": {DAVE: 1}}, "")
    )
    assert member(r, DAVE, "join") is None
    assert member(r, DAVE, "ban", BOB) is None  # an additional creator, at the creators' level
    # v11: the creator is an ordinary user at her power level.
    r11 = room("11")
    assert r11.send("m.room.power_levels", ALICE, {"users": {ALICE: 0, BOB: 100}}, "") is None
    assert member(r11, BOB, "ban", ALICE) is None


@pytest.mark.parametrize("bad", [BOB, ["notauser"], [5], ["@:"], ["@d:c..test"], ["@d:c.test\n"]])
def test_v12_additional_creators_must_be_a_list_of_user_ids(bad: Any) -> None:
    r = Room("12", create_content={"room_version": "12", "additional_creators": bad})
    verdict = check_event_auth(r.create_id, r.create, {}, r.rules)
    assert "additional_creators" in str(verdict)


@pytest.mark.parametrize("good", [[DAVE, BOB], ["@:c.test"], ["@d:c.test:99999"], ["@d:[::1]:8"]])
def test_v12_additional_creators_as_synapse_reads_user_ids(good: Any) -> None:
    r = Room("12", create_content={"room_version": "12", "additional_creators": good})
    assert check_event_auth(r.create_id, r.create, {}, r.rules) is None


# --- Knocking (v7), restricted joins (v8), knock_restricted (v10) ---------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_knocking(version: str) -> None:
    r = room(version, join_rule="knock")
    verdict = member(r, DAVE, "knock")
    if not r.rules.auth.knock_join_rule:
        assert "unknown membership 'knock'" in str(verdict)
        return
    assert verdict is None
    assert "already invited" not in str(member(r, ALICE, "invite", DAVE))
    assert "already joined" in str(member(r, BOB, "knock"))
    public = room(version)
    assert "does not allow knocking" in str(member(public, DAVE, "knock"))


@pytest.mark.parametrize("version", VERSIONS)
def test_knock_restricted_from_v10(version: str) -> None:
    r = room(version, join_rule="knock_restricted")
    verdict = member(r, DAVE, "knock")
    if r.rules.auth.knock_restricted_join_rule:
        assert verdict is None
    else:
        assert verdict is not None


@pytest.mark.parametrize("version", VERSIONS)
def test_restricted_joins(version: str) -> None:
    r = room(version, join_rule="restricted", levels={"invite": 50, "users_default": 0})
    via = "join_authorised_via_users_server"
    if not r.rules.auth.restricted_join_rule:
        assert "does not allow joining" in str(member(r, DAVE, "join", **{via: ALICE}))
        return
    assert "without join_authorised_via_users_server" in str(member(r, DAVE, "join"))
    assert "below the invite level" in str(member(r, DAVE, "join", **{via: BOB}))
    assert "not joined" in str(member(r, DAVE, "join", **{via: CAROL}))
    assert member(r, DAVE, "join", **{via: ALICE}) is None
    assert "is not one of its auth types" in str(
        r.send(
            "m.room.member",
            CAROL,
            {"membership": "join"},
            CAROL,
            auth=[
                *r.auth_ids("m.room.member", CAROL, {"membership": "join"}, CAROL),
                r.state[("m.room.member", ALICE)],
            ],
        )
    )


# --- Third-party invites -------------------------------------------------------------------


def third_party_room(version: str) -> Room:
    r = room(version)
    content = {
        "display_name": "d…",
        "key_validity_url": "https://id.test/isvalid",
        "public_key": IDENTITY_PUBLIC_KEYS[0],
    }
    assert r.send("m.room.third_party_invite", ALICE, content, "tok") is None
    return r


def third_party_invite(r: Room, sender: str, signed: dict[str, Any]) -> str | None:
    content = {
        "membership": "invite",
        "third_party_invite": {"display_name": "d…", "signed": signed},
    }
    return r.send("m.room.member", sender, content, DAVE)


@pytest.mark.parametrize("version", VERSIONS)
def test_third_party_invites(version: str) -> None:
    r = third_party_room(version)
    signed = sign_json({"mxid": DAVE, "token": "tok"}, "id.test", IDENTITY_KEY)
    assert "not valid" in str(third_party_invite(r, BOB, signed))  # not the 3pid's sender
    forged = sign_json({"mxid": DAVE, "token": "tok"}, "id.test", OTHER_KEY)
    assert "not valid" in str(third_party_invite(r, ALICE, forged))
    assert "not valid" in str(third_party_invite(r, ALICE, {**signed, "mxid": CAROL}))
    assert third_party_invite(r, ALICE, signed) is None
    assert member(r, DAVE, "join") is None
    assert ("m.room.third_party_invite", "tok") in auth_types_for_event(
        {
            "type": "m.room.member",
            "sender": ALICE,
            "state_key": DAVE,
            "content": {"membership": "invite", "third_party_invite": {"signed": signed}},
        },
        r.rules,
    )


def test_a_third_party_invite_without_a_token_is_malformed() -> None:
    r = third_party_room("10")
    verdict = third_party_invite(r, ALICE, {"mxid": DAVE, "signatures": {}})
    assert "malformed" in str(verdict)
    with pytest.raises(ValueError):
        auth_types_for_event(
            {"type": "m.room.member", "sender": ALICE, "state_key": DAVE, "content": {}}, r.rules
        )


# --- Aliases (v1-v5), redactions (v1-v2) ---------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_aliases(version: str) -> None:
    r = room(version)
    verdict = r.send("m.room.aliases", BOB, {"aliases": ["#x:b.test"]}, "b.test")
    if r.rules.auth.special_case_aliases_auth:
        assert verdict is None  # no membership or power check at all
        assert "not the sender's domain" in str(
            r.send("m.room.aliases", BOB, {"aliases": []}, "a.test")
        )
        assert r.send("m.room.aliases", MALLORY, {"aliases": []}, "m.test") is None
    else:
        assert "below the level to send" in str(verdict)


@pytest.mark.parametrize("version", VERSIONS)
def test_redactions_below_the_redact_level(version: str) -> None:
    r = room(version)
    own = {"redacts": "$mine:b.test"}
    foreign = {"redacts": "$theirs:a.test"}
    content_of = (
        (lambda extra: extra) if r.rules.redaction.keep_redaction_redacts else (lambda _: {})
    )
    assert r.send("m.room.redaction", BOB, content_of(own), extra=own) is None
    verdict = r.send("m.room.redaction", BOB, content_of(foreign), extra=foreign)
    if r.rules.auth.redaction_checks_event_id_domain:
        assert "another server's events" in str(verdict)
        assert r.send("m.room.redaction", ALICE, {}, extra=foreign) is None
    else:
        assert verdict is None  # checked when the redaction is shown, not here


# --- Power levels read with int() (v1-v9) and as JSON integers (v10+) ----------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("level", "read_as"),
    [("50", 50), (" 50 ", 50), ("+50", 50), ("5_0", 50), ("٥٠", 50), (True, 1), (50.9, 50)],
)
def test_levels_int_leniency_until_v10(version: str, level: Any, read_as: int) -> None:
    r = room(version)
    users = {BOB: level} if r.rules.auth.privileged_creators else {ALICE: 100, BOB: level}
    verdict = r.send("m.room.power_levels", ALICE, {"users": users}, "")
    if isinstance(level, float) and r.rules.format.strict_canonical_json:
        assert "step 1" in str(verdict)  # v6+: no floats in events at all
    elif r.rules.auth.enforce_int_power_levels:
        assert "must map to integers" in str(verdict)
    else:
        assert verdict is None  # Python's int() reads it: Bob is now at read_as
        name = r.send("m.room.name", BOB, {"name": "x"}, "")  # needs state_default, 50
        assert (name is None) == (read_as >= 50)


@pytest.mark.parametrize("version", VERSIONS)
def test_levels_that_are_not_numbers(version: str) -> None:
    r = room(version)
    assert "not a valid power level" in str(
        r.send("m.room.power_levels", ALICE, {"users": {BOB: "abc"}}, "")
    )
    assert "not a valid user ID" in str(
        r.send("m.room.power_levels", ALICE, {"users": {"bob": 1}}, "")
    )
    reason = "ban must be an integer" if r.rules.auth.enforce_int_power_levels else "malformed"
    assert reason in str(r.send("m.room.power_levels", ALICE, {"ban": "abc"}, ""))


# --- The auth events themselves (rule 2), the create event (rule 1), m.federate -------------


@pytest.mark.parametrize("version", VERSIONS)
def test_auth_events_selection(version: str) -> None:
    r = room(version)
    auth = r.auth_ids("m.room.message", BOB, {}, None)
    assert "two auth events" in str(r.send("m.room.message", BOB, {}, auth=[*auth, auth[0]]))
    join_rules = r.state[("m.room.join_rules", "")]
    assert "not one of its auth types" in str(
        r.send("m.room.message", BOB, {}, auth=[*auth, join_rules])
    )
    assert "unknown" in str(r.send("m.room.message", BOB, {}, auth=[*auth, "$nowhere:a.test"]))
    rejected = r.build("m.room.message", MALLORY, {})
    r.commit(*rejected, accepted=False)
    assert "was rejected" in str(r.send("m.room.message", BOB, {}, auth=[*auth, rejected[0]]))
    other = Room(version, creator=DAVE)  # another room, whose events peekproxy also holds
    assert other.send("m.room.member", DAVE, {"membership": "join"}, DAVE) is None
    r.events.update(other.events)
    foreign = other.state[("m.room.member", DAVE)]
    assert "in another room" in str(r.send("m.room.message", BOB, {}, auth=[*auth, foreign]))
    if not r.rules.auth.create_event_implied:
        without_create = [i for i in auth if i != r.create_id]
        assert "no m.room.create" in str(r.send("m.room.message", BOB, {}, auth=without_create))


@pytest.mark.parametrize("version", VERSIONS)
def test_create_events(version: str) -> None:
    r = room(version)
    event_id, again = r.build("m.room.create", BOB, {"creator": BOB, "room_version": version}, "")
    if r.rules.auth.create_event_implied:
        del again["room_id"]  # v12: a create event has none (step 1 refuses one)
        event_id = compute_event_id(again, r.rules)
    assert "prev_events" in str(r.verdict(event_id, again))
    if not r.rules.auth.implicit_room_creator:
        lacking = Room(version, create_content={"room_version": version})
        assert "creator" in str(
            check_event_auth(lacking.create_id, lacking.create, {}, lacking.rules)
        )


@pytest.mark.parametrize("version", VERSIONS)
def test_the_creator_joins_only_right_after_the_create_event(version: str) -> None:
    r = Room(version)
    assert "not invited" in str(
        r.send("m.room.member", ALICE, {"membership": "join"}, ALICE, prev=[])
    )
    assert r.send("m.room.member", ALICE, {"membership": "join"}, ALICE) is None


@pytest.mark.parametrize("version", VERSIONS)
def test_unfederated_rooms(version: str) -> None:
    content: dict[str, Any] = {"room_version": version, "m.federate": False}
    if not room_version(version).auth.implicit_room_creator:
        content["creator"] = ALICE
    r = room(version, create_content=content, bob_joins=False)
    assert "not federated" in str(member(r, BOB, "join"))
    # Synapse (not the spec) also refuses a local user inviting a remote one.
    assert "not federated" in str(member(r, ALICE, "invite", BOB))


# --- Steps 5 and 6: against a state other than the event's auth events ----------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_soft_fail_against_the_current_state(version: str) -> None:
    r = room(version)
    event_id, message = r.build("m.room.message", BOB, {"body": "before the ban"})
    assert r.verdict(event_id, message) is None
    assert member(r, ALICE, "ban", BOB) is None
    # Still fine by its own auth events (step 4), not against the current state (step 6).
    assert check_event_auth(event_id, message, r.events, r.rules) is None
    assert "not joined" in str(check_against_state(event_id, message, r.state_pdus(), r.rules))


# --- Regression cases (disagreements with Synapse, and its divergences from the spec) ------


@pytest.mark.parametrize(
    ("name", "case"), load_regressions(), ids=[n for n, _ in load_regressions()]
)
def test_regression_cases(name: str, case: dict[str, Any]) -> None:
    synapse_accepts, verdict = replay_regression(case)
    assert (verdict is None) == synapse_accepts, (
        f"{name}: peekproxy {verdict}, Synapse {case['synapse']}"
    )

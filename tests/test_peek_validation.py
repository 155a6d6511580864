"""Validation of MSC2444 peek responses (protocol.md decision 1, §1.3, §1.4; scenario 20).

The real Synapse-signed responses ``peek-response-v10.json`` / ``-v12.json`` are read at run
time from ``tests/fixtures/synapse-pdus``. Each rejection rule gets one case made
by editing them: forged cases tamper with a signed field so that the signature breaks;
structural cases re-sign edited or new events with a throwaway key that the test's
:class:`KeyLookup` also knows (as a second key of the fixture's server). Responses made by the
testbed's room model (room versions 10-12) are checked too.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from signedjson.key import generate_signing_key, get_verify_key
from unpaddedbase64 import encode_base64

from peekproxy.core.events import (
    compute_event_id,
    content_hash,
    redact,
    reference_hash_input,
)
from peekproxy.core.pdu_signatures import KeyLookup, VerifyKeyInfo, key_table
from peekproxy.core.room_versions import KNOWN_ROOM_VERSIONS, RoomVersion, room_version
from peekproxy.core.validation import (
    DEFAULT_RENEWAL_INTERVAL_MS,
    InvalidPeekResponse,
    RoomNotPeekable,
    ValidatedPeek,
    is_empty_renewal,
    peek_response_pdus,
    response_room_version,
    validate_peek_response,
)
from peekproxy.testbed.rooms import TestbedRoom

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "synapse-pdus"
VERSIONS = ["10", "12"]
#: A throwaway key that the test's KeyLookup accepts for the fixture's server.
KEY = generate_signing_key("peektest")
KEY_ID = f"{KEY.alg}:{KEY.version}"
E = re.escape

Body = dict[str, Any]


class Fixture:
    """One ``peek-response-vN.json``: a fresh deep copy of the body plus helpers."""

    def __init__(self, version: str) -> None:
        self.raw: Body = json.loads((FIXTURES / f"peek-response-v{version}.json").read_text())
        self.meta: dict[str, Any] = self.raw["_fixture"]
        self.version: str = self.raw["room_version"]
        self.rules: RoomVersion = room_version(self.version)
        self.server: str = self.meta["server_name"]
        self.room_id: str = self.meta["room_id"]
        table = {
            (self.server, key_id): VerifyKeyInfo.from_base64(key)
            for key_id, key in self.meta["verify_keys"].items()
        }
        table[(self.server, KEY_ID)] = VerifyKeyInfo(get_verify_key(KEY))
        self.keys: KeyLookup = key_table(table)

    def body(self) -> Body:
        """A deep copy of the response without the ``_fixture`` notes."""
        body = copy.deepcopy(self.raw)
        del body["_fixture"]
        return body

    def validate(self, body: Any, **kwargs: Any) -> ValidatedPeek:
        options: dict[str, Any] = {
            "room_id": self.room_id,
            "supported_versions": KNOWN_ROOM_VERSIONS,
            "keys": self.keys,
        }
        options.update(kwargs)
        return validate_peek_response(body, **options)

    def event_id(self, pdu: dict[str, Any]) -> str:
        return compute_event_id(pdu, self.rules)

    def sign(self, pdu: dict[str, Any], *, rehash: bool = True) -> dict[str, Any]:
        """Re-hash ``pdu`` (unless not ``rehash``) and sign it with :data:`KEY` as the
        fixture's server."""
        pdu = {k: v for k, v in pdu.items() if k not in ("signatures", "unsigned")}
        if rehash:
            del pdu["hashes"]
            pdu["hashes"] = {"sha256": encode_base64(content_hash(pdu))}
        signature = KEY.sign(reference_hash_input(redact(pdu, self.rules))).signature
        pdu["signatures"] = {self.server: {KEY_ID: encode_base64(signature)}}
        return pdu

    def find(self, body: Body, type_: str, where: str = "state") -> dict[str, Any]:
        found: dict[str, Any] = next(p for p in body[where] if p["type"] == type_)
        return found

    def state_event(
        self, body: Body, type_: str, content: dict[str, Any], state_key: str = ""
    ) -> dict[str, Any]:
        """A new state event by the creator, authorised like the fixture's name event."""
        model = self.find(body, "m.room.name")
        pdu = {
            **copy.deepcopy(model),
            "type": type_,
            "state_key": state_key,
            "content": content,
            "depth": body["latest_event"]["depth"] + 1,
            "prev_events": [self.event_id(body["latest_event"])],
        }
        return self.sign(pdu)


@pytest.fixture(params=VERSIONS)
def fx(request: pytest.FixtureRequest) -> Fixture:
    return Fixture(request.param)


def _rejects(fx: Fixture, body: Any, match: str, **kwargs: Any) -> InvalidPeekResponse:
    with pytest.raises(InvalidPeekResponse, match=match) as info:
        fx.validate(body, **kwargs)
    assert "\n" not in str(info.value)
    return info.value


# --- the real fixtures ----------------------------------------------------------------------


def test_fixture_validates(fx: Fixture) -> None:
    body = fx.body()
    peek = fx.validate(body)
    meta = fx.meta
    assert peek.room_id == fx.room_id
    assert peek.room_version == fx.version
    assert peek.latest_event_id == meta["latest_event_id"]
    assert sorted(peek.state.values()) == sorted(meta["state_event_ids"])
    assert peek.auth_chain_ids == meta["auth_chain_event_ids"]
    assert peek.renewal_interval_ms == body["renewal_interval"]
    assert peek.redacted == frozenset()
    expected_ids = {*meta["state_event_ids"], *meta["auth_chain_event_ids"]}
    expected_ids.add(meta["latest_event_id"])
    assert set(peek.events) == expected_ids
    # Each state entry is keyed by its event's (type, state_key).
    for (type_, state_key), event_id in peek.state.items():
        pdu = peek.events[event_id]
        assert (pdu["type"], pdu["state_key"]) == (type_, state_key)
    for pdu in body["state"]:
        assert peek.events[fx.event_id(pdu)] == pdu
    assert ("m.room.create", "") in peek.state
    assert ("m.room.member", "@bob:hs-alpha.test") in peek.state
    # The superseded power levels are in the auth chain only.
    assert len([p for p in peek.events.values() if p["type"] == "m.room.power_levels"]) == 2


def test_fixture_validates_with_only_its_own_version_supported(fx: Fixture) -> None:
    fx.validate(fx.body(), supported_versions={fx.version})


def test_fixture_body_is_not_modified(fx: Fixture) -> None:
    body = fx.body()
    before = copy.deepcopy(body)
    fx.validate(body)
    assert body == before


def test_response_pdus(fx: Fixture) -> None:
    body = fx.body()
    pdus = peek_response_pdus(body)
    assert len(pdus) == len(body["state"]) + len(body["auth_chain"]) + 1
    assert pdus[-1] is body["latest_event"]
    assert peek_response_pdus({"state": [1, None], "latest_event": "x"}) == []
    assert peek_response_pdus([]) == []  # type: ignore[arg-type]
    r4 = {"events": body["state"], "latest_event_state_ids": {}}
    assert peek_response_pdus(r4) == body["state"]


def test_response_room_version() -> None:
    assert response_room_version({}) == "1"
    assert response_room_version({"room_version": ""}) == "1"
    assert response_room_version({"room_version": None}) == "1"
    assert response_room_version({"room_version": "12"}) == "12"
    with pytest.raises(InvalidPeekResponse, match="room_version must be a string"):
        response_room_version({"room_version": 10})


def test_reason_is_one_line() -> None:
    assert str(InvalidPeekResponse("bad\nthing\u2028here\x00")) == "bad\\nthing\\u2028here\\x00"
    assert str(InvalidPeekResponse("état ok")) == "état ok"


def test_r4_room_version_from_create() -> None:
    create: Body = {"type": "m.room.create", "content": {}}
    r4: Body = {"latest_event_state_ids": {}, "events": [create]}
    assert response_room_version(r4) == "1"
    create["content"]["room_version"] = "11"
    assert response_room_version(r4) == "11"
    r4["room_version"] = "10"
    assert response_room_version(r4) == "10"
    # Not R4-shaped (has state): no inference.
    assert response_room_version({"state": [], "events": r4["events"]}) == "1"


def test_is_empty_renewal() -> None:
    assert is_empty_renewal({})
    assert is_empty_renewal({"renewal_interval": 60_000})  # the R4 /renew reply
    assert not is_empty_renewal({"state": []})
    assert not is_empty_renewal({"renewal_interval": 1, "state": []})
    assert not is_empty_renewal([])
    assert not is_empty_renewal(None)
    assert not is_empty_renewal("{}")


# --- rejections: the envelope ---------------------------------------------------------------


@pytest.mark.parametrize("body", [[], "{}", None, 3])
def test_not_an_object(fx: Fixture, body: Any) -> None:
    _rejects(fx, body, "^the peek response is not a JSON object$")


def test_empty_renewal_is_not_a_full_response(fx: Fixture) -> None:
    _rejects(fx, {}, "state must be a list of PDUs")


@pytest.mark.parametrize("interval", [0, -1, "3600000", 3600000.0, True, [1]])
def test_bad_renewal_interval(fx: Fixture, interval: Any) -> None:
    body = fx.body()
    body["renewal_interval"] = interval
    _rejects(fx, body, "renewal_interval must be a positive integer")


def test_missing_renewal_interval_takes_the_default(fx: Fixture) -> None:
    body = fx.body()
    body["renewal_interval"] = None
    assert fx.validate(body).renewal_interval_ms == DEFAULT_RENEWAL_INTERVAL_MS == 600_000
    del body["renewal_interval"]
    assert fx.validate(body).renewal_interval_ms == DEFAULT_RENEWAL_INTERVAL_MS


def test_huge_renewal_interval_is_accepted_unclamped(fx: Fixture) -> None:
    body = fx.body()
    body["renewal_interval"] = 3_600_000_000  # Dendrite
    assert fx.validate(body).renewal_interval_ms == 3_600_000_000


def test_unknown_room_version(fx: Fixture) -> None:
    body = fx.body()
    body["room_version"] = "org.example.v99"
    _rejects(fx, body, "unknown room version 'org.example.v99'")
    body["room_version"] = 12
    _rejects(fx, body, "room_version must be a string")


def test_unsupported_room_version(fx: Fixture) -> None:
    supported = {v for v in KNOWN_ROOM_VERSIONS if v != fx.version}
    _rejects(
        fx, fx.body(), f"room version {fx.version} is not supported", supported_versions=supported
    )


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("state", {}, "state must be a list"),
        ("state", None, "state must be a list"),
        ("auth_chain", "x", "auth_chain must be a list"),
        ("latest_event", None, "latest_event must be a PDU"),
        ("latest_event", "$abc", "latest_event must be a PDU"),
    ],
)
def test_malformed_shape(fx: Fixture, key: str, value: Any, match: str) -> None:
    body = fx.body()
    body[key] = value
    _rejects(fx, body, match)


def test_non_object_pdu(fx: Fixture) -> None:
    body = fx.body()
    body["auth_chain"].append("$not-a-pdu")
    _rejects(fx, body, r"^auth_chain\[4\] failed the PDU checks: PDU is not a JSON object$")


# --- rejections: forged events --------------------------------------------------------------


def test_forged_state_event(fx: Fixture) -> None:
    """history_visibility survives redaction, so changing it breaks the signature."""
    body = fx.body()
    hv = fx.find(body, "m.room.history_visibility")
    index = body["state"].index(hv)
    hv["content"]["history_visibility"] = "joined"
    forged_id = fx.event_id(hv)
    error = _rejects(fx, body, rf"^state\[{index}\] \({E(forged_id)}\) failed the PDU checks: ")
    assert "no valid signature from hs-alpha.test" in str(error)
    assert "bad signature" in str(error)


def test_forged_auth_chain_event(fx: Fixture) -> None:
    body = fx.body()
    body["auth_chain"][2]["content"]["users"]["@bob:hs-alpha.test"] = 100
    _rejects(fx, body, r"^auth_chain\[2\] \(\$[^)]+\) failed the PDU checks: no valid signature")


def test_forged_latest_event(fx: Fixture) -> None:
    body = fx.body()
    body["latest_event"]["origin_server_ts"] += 1
    _rejects(fx, body, r"^latest_event \(\$[^)]+\) failed the PDU checks: no valid signature")


def test_unsigned_event(fx: Fixture) -> None:
    body = fx.body()
    body["state"][3]["signatures"] = {}
    _rejects(fx, body, r"^state\[3\] .*failed the PDU checks: not signed by hs-alpha.test$")


def test_unknown_key(fx: Fixture) -> None:
    _rejects(fx, fx.body(), r"^state\[0\] .*: no valid signature .*unknown key", keys=key_table({}))


def test_invalid_pdu_format(fx: Fixture) -> None:
    body = fx.body()
    del body["state"][5]["depth"]
    _rejects(fx, body, r"^state\[5\] .*missing or invalid 'depth'")


# --- rejections: structure ------------------------------------------------------------------


def test_state_entry_without_state_key(fx: Fixture) -> None:
    body = fx.body()
    body["state"].append(copy.deepcopy(body["latest_event"]))
    n = len(body["state"]) - 1
    latest = fx.meta["latest_event_id"]
    _rejects(
        fx,
        body,
        rf"^state\[{n}\] \({E(latest)}, 'm.room.message'\) has no state_key: not a state event$",
    )


def test_duplicate_state_key(fx: Fixture) -> None:
    body = fx.body()
    old_levels = fx.find(body, "m.room.power_levels", "auth_chain")
    body["state"].append(copy.deepcopy(old_levels))
    new_levels = fx.find(body, "m.room.power_levels")
    _rejects(
        fx,
        body,
        rf"^state has two events for \(m.room.power_levels, ''\): "
        rf"{E(fx.event_id(new_levels))} and {E(fx.event_id(old_levels))}$",
    )


def test_same_event_twice_in_state_is_tolerated(fx: Fixture) -> None:
    body = fx.body()
    body["state"].append(copy.deepcopy(body["state"][4]))
    assert len(fx.validate(body).state) == len(fx.meta["state_event_ids"])


def test_no_create_in_state(fx: Fixture) -> None:
    body = fx.body()
    body["state"] = [p for p in body["state"] if p["type"] != "m.room.create"]
    _rejects(fx, body, "^no m.room.create event in the state$")


def test_create_version_disagrees_with_response(fx: Fixture) -> None:
    body = fx.body()
    body["room_version"] = "11"
    _rejects(
        fx,
        body,
        f"^the m.room.create event says room version '{fx.version}' but the response says 11$",
    )


def test_create_version_defaults_to_1(fx: Fixture) -> None:
    body = fx.body()
    del body["room_version"]  # the response's version defaults to "1" too
    _rejects(fx, body, f"says room version '{fx.version}' but the response says 1$")
    body = fx.body()
    for where in ("state", "auth_chain"):
        create = fx.find(body, "m.room.create", where)
        del create["content"]["room_version"]
    _rejects(fx, body, f"says room version '1' but the response says {fx.version}$")


def test_create_of_another_room(fx: Fixture) -> None:
    other = "!someotherroom:hs-alpha.test" if fx.version == "10" else "!" + "A" * 43
    create_id = fx.event_id(fx.find(fx.body(), "m.room.create"))
    if fx.version == "10":
        where = f"is in room '{fx.room_id}'"
    else:
        where = f"founds room {fx.room_id}"
    match = "^" + E(f"state[0]: m.room.create {create_id} {where}, not {other}") + "$"
    _rejects(fx, fx.body(), match, room_id=other)


def test_forged_create_for_another_room(fx: Fixture) -> None:
    """A validly signed create event of another room (v10: its room_id; v12: its hash)."""
    body = fx.body()
    create = fx.find(body, "m.room.create")
    if fx.version == "10":
        create["room_id"] = "!someotherroom:hs-alpha.test"
    else:
        create["origin_server_ts"] += 1  # another create event, so another room ID
    forged = fx.sign(create)
    forged_id = fx.event_id(forged)
    body["state"][0] = forged
    _rejects(fx, body, rf"^state\[0\]: m.room.create {E(forged_id)} (is in|founds) room ")


def test_event_of_another_room(fx: Fixture) -> None:
    body = fx.body()
    other = "!someotherroom:hs-alpha.test" if fx.version == "10" else "!" + "B" * 43
    body["latest_event"] = fx.sign({**body["latest_event"], "room_id": other})
    latest_id = fx.event_id(body["latest_event"])
    _rejects(fx, body, rf"^latest_event: event {E(latest_id)} is in room '{E(other)}', not ")


def _v1_create() -> tuple[Fixture, dict[str, Any], Body]:
    """The real v1 create event and a minimal v1 response around it (room versions 1 and 2
    take event IDs from a field, so two different events can claim one ID)."""
    fx = Fixture("10")
    room = json.loads((FIXTURES / "v1.json").read_text())
    fx.rules, fx.room_id = room_version("1"), room["room_id"]
    create = room["events"][0]["pdu"]
    body = {
        "room_version": "1",
        "state": [create],
        "auth_chain": [],
        "latest_event": create,
        "renewal_interval": 60_000,
    }
    return fx, create, body


def test_two_different_events_with_one_id() -> None:
    fx, create, body = _v1_create()
    body["auth_chain"] = [
        fx.sign({**create, "content": {**create["content"], "m.federate": False}})
    ]
    _rejects(
        fx, body, rf"^auth_chain\[0\]: two different events have the ID {E(create['event_id'])}$"
    )
    # A copy that fails the content hash and whose redacted form differs is no excuse either.
    other = {**create, "content": {**create["content"], "creator": "@bob:hs-alpha.test"}}
    other = fx.sign(other, rehash=False)
    body["auth_chain"] = [other]
    _rejects(fx, body, "two different events have the ID")


def test_hash_mismatch_copy_and_intact_copy(fx: Fixture) -> None:
    """One copy of an event fails the content hash, another is intact: the intact one is
    stored, whichever comes first."""
    intact = fx.find(fx.body(), "m.room.topic")
    topic_id = fx.event_id(intact)
    tampered = copy.deepcopy(intact)
    tampered["content"]["topic"] = "changed after signing"  # not covered by the signature
    for state_copy, chain_copy in ((intact, tampered), (tampered, intact)):
        body = fx.body()
        body["state"][body["state"].index(intact)] = copy.deepcopy(state_copy)
        body["auth_chain"].append(copy.deepcopy(chain_copy))
        peek = fx.validate(body)
        assert topic_id not in peek.redacted
        assert peek.events[topic_id] == intact


def test_hash_mismatch_copy_equal_to_intact_after_redaction(fx: Fixture) -> None:
    """join_rules content is all kept by redaction: the redacted copy of a tampered event
    equals the intact event; it must still not be listed as redacted."""
    for where in ("state", "auth_chain"):
        body = fx.body()
        join_rules = fx.find(body, "m.room.join_rules", where)
        join_rules["content"]["org.example.junk"] = True
        join_rules_id = fx.event_id(join_rules)
        peek = fx.validate(body)
        assert join_rules_id not in peek.redacted
        assert peek.events[join_rules_id] == fx.find(fx.body(), "m.room.join_rules")
    # With only the tampered copy, it is stored redacted.
    body = fx.body()
    fx.find(body, "m.room.join_rules", "auth_chain")["content"]["org.example.junk"] = True
    body["state"].remove(fx.find(body, "m.room.join_rules"))
    peek = fx.validate(body)
    assert peek.redacted == {join_rules_id}


def test_auth_chain_does_not_cover_state(fx: Fixture) -> None:
    body = fx.body()
    old_levels = fx.find(body, "m.room.power_levels", "auth_chain")
    body["auth_chain"].remove(old_levels)
    old_id = fx.event_id(old_levels)
    _rejects(
        fx,
        body,
        rf"^the auth chain does not cover \$\S+: its auth event {E(old_id)} is neither in the "
        "state nor in the auth chain$",
    )


def test_auth_chain_does_not_cover_latest_event(fx: Fixture) -> None:
    body = fx.body()
    missing = "$" + "m" * 43
    latest = body["latest_event"]
    body["latest_event"] = fx.sign({**latest, "auth_events": [*latest["auth_events"], missing]})
    latest_id = fx.event_id(body["latest_event"])
    _rejects(
        fx,
        body,
        rf"^the auth chain does not cover {E(latest_id)}: its auth event {E(missing)} is neither",
    )


def test_v12_create_may_be_absent_from_auth_chain() -> None:
    fx = Fixture("12")
    body = fx.body()
    body["auth_chain"] = [p for p in body["auth_chain"] if p["type"] != "m.room.create"]
    peek = fx.validate(body)
    assert fx.event_id(fx.find(body, "m.room.create")) in peek.events


def test_not_world_readable(fx: Fixture) -> None:
    body = fx.body()
    hv = fx.find(body, "m.room.history_visibility")
    body["state"][body["state"].index(hv)] = fx.sign(
        {**hv, "content": {"history_visibility": "shared"}}
    )
    error = _rejects(fx, body, "^history_visibility is 'shared', not world_readable$")
    assert isinstance(error, RoomNotPeekable)


def test_missing_history_visibility_counts_as_shared(fx: Fixture) -> None:
    body = fx.body()
    body["state"].remove(fx.find(body, "m.room.history_visibility"))
    error = _rejects(fx, body, "^history_visibility is 'shared', not world_readable$")
    assert isinstance(error, RoomNotPeekable)


def test_encrypted(fx: Fixture) -> None:
    body = fx.body()
    encryption = fx.state_event(body, "m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"})
    body["state"].append(encryption)
    error = _rejects(
        fx, body, rf"^the room is encrypted \({E(fx.event_id(encryption))} in state\)$"
    )
    assert isinstance(error, RoomNotPeekable)


def test_resigned_state_event_is_accepted(fx: Fixture) -> None:
    """Control for the structural cases: re-signing with the test key alone is fine."""
    body = fx.body()
    body["state"].append(fx.state_event(body, "org.example.extra", {"x": 1}))
    assert ("org.example.extra", "") in fx.validate(body).state


# --- content-hash mismatches ----------------------------------------------------------------


def test_hash_mismatch_is_stored_redacted(fx: Fixture) -> None:
    body = fx.body()
    topic = fx.find(body, "m.room.topic")
    topic["content"]["topic"] = "changed after signing"
    body["latest_event"]["content"]["body"] = "changed after signing"
    peek = fx.validate(body)
    topic_id, latest_id = fx.event_id(topic), fx.meta["latest_event_id"]
    assert peek.redacted == {topic_id, latest_id}
    assert peek.events[topic_id] == redact(topic, fx.rules)
    assert peek.events[topic_id]["content"] == {}
    assert peek.events[latest_id]["content"] == {}
    assert peek.state[("m.room.topic", "")] == topic_id
    assert peek.latest_event_id == latest_id


def test_redacted_history_visibility_still_counts(fx: Fixture) -> None:
    body = fx.body()
    fx.find(body, "m.room.history_visibility")["content"]["org.example.junk"] = 1
    peek = fx.validate(body)
    hv_id = peek.state[("m.room.history_visibility", "")]
    assert hv_id in peek.redacted
    assert peek.events[hv_id]["content"] == {"history_visibility": "world_readable"}


# --- the R4 shape ---------------------------------------------------------------------------


def _r4(fx: Fixture, body: Body) -> Body:
    events: dict[str, dict[str, Any]] = {}
    for pdu in [*body["auth_chain"], *body["state"], body["latest_event"]]:
        events.setdefault(fx.event_id(pdu), pdu)
    state_ids = [fx.event_id(p) for p in body["state"]]
    return {
        "latest_event_state_ids": {fx.event_id(body["latest_event"]): state_ids[4:]},
        "common_state_ids": state_ids[:4],
        "events": list(events.values()),
        "renewal_interval": 3_600_000,
    }


def test_r4_shape_validates_to_the_same_state(fx: Fixture) -> None:
    body = fx.body()
    r3 = fx.validate(body)
    r4_body = _r4(fx, body)
    r4 = fx.validate(r4_body)
    assert r4.state == r3.state
    assert r4.latest_event_id == r3.latest_event_id == fx.meta["latest_event_id"]
    assert r4.events == r3.events
    assert r4.auth_chain_ids == fx.meta["auth_chain_event_ids"]
    assert r4.renewal_interval_ms == 3_600_000
    # R4 has no room_version: it comes from the create event in events.
    assert "room_version" not in r4_body
    assert response_room_version(r4_body) == r4.room_version == fx.version
    assert len(peek_response_pdus(r4_body)) == len(r4_body["events"])


def test_r4_latest_is_the_deepest_extremity(fx: Fixture) -> None:
    body = fx.body()
    r4_body = _r4(fx, body)
    # A shallower extremity (the name event) with a state list that would differ.
    name_id = fx.event_id(fx.find(body, "m.room.name"))
    r4_body["latest_event_state_ids"] = {name_id: [], **r4_body["latest_event_state_ids"]}
    assert fx.validate(r4_body).latest_event_id == fx.meta["latest_event_id"]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda b: b.update(latest_event_state_ids={}), "latest_event_state_ids must be a non"),
        (lambda b: b.update(latest_event_state_ids=[]), "latest_event_state_ids must be a non"),
        (lambda b: b.update(common_state_ids="x"), "common_state_ids must be a list of event"),
        (lambda b: b.update(events={}), "events must be a list of PDUs"),
        (
            lambda b: b["latest_event_state_ids"].update({"$nope": []}),
            r"extremity '\$nope' is not in events",
        ),
        (lambda b: b["common_state_ids"].append("$gone"), r"state event '\$gone' is not in events"),
        (lambda b: b["events"][0]["signatures"].clear(), r"^events\[0\] .*not signed by"),
    ],
)
def test_r4_rejections(fx: Fixture, edit: Callable[[Body], None], match: str) -> None:
    r4_body = _r4(fx, fx.body())
    edit(r4_body)
    _rejects(fx, r4_body, match)


def test_r4_missing_auth_event(fx: Fixture) -> None:
    body = fx.body()
    r4_body = _r4(fx, body)
    old_levels_id = fx.event_id(fx.find(body, "m.room.power_levels", "auth_chain"))
    r4_body["events"] = [p for p in r4_body["events"] if fx.event_id(p) != old_levels_id]
    _rejects(fx, r4_body, rf"its auth event {E(old_levels_id)} is neither")


# --- responses made by the testbed's room model ---------------------------------------------

TB_SERVER = "testbed.test"
TB_KEY = generate_signing_key("tb")
TB_KEYS = key_table(
    {(TB_SERVER, f"ed25519:{TB_KEY.version}"): VerifyKeyInfo(get_verify_key(TB_KEY))}
)
T0 = 1_700_000_000_000


def _testbed_room(version: str, **kwargs: Any) -> TestbedRoom:
    return TestbedRoom.create(
        server_name=TB_SERVER,
        signing_key=TB_KEY,
        room_version=version,
        creator=f"@alice:{TB_SERVER}",
        now_ms=T0,
        **kwargs,
    )


def _testbed_response(room: TestbedRoom) -> Body:
    """What the testbed server answers to a PUT /peek (TestbedServer.peek_response)."""
    state = room.current_state()
    return {
        "state": state,
        "auth_chain": room.auth_chain(state),
        "latest_event": room.latest()[1],
        "renewal_interval": 60_000,
        "room_version": room.rules.identifier,
    }


@pytest.mark.parametrize("version", ["10", "11", "12"])
def test_testbed_response_validates(version: str) -> None:
    room = _testbed_room(version, alias=f"#a:{TB_SERVER}", name="Room", topic="Topic")
    room.join(TB_KEY, f"@bob:{TB_SERVER}", T0 + 1)
    room.send(
        TB_KEY,
        sender=f"@bob:{TB_SERVER}",
        type="m.room.message",
        content={"msgtype": "m.text", "body": "hi"},
        now_ms=T0 + 2,
    )
    peek = validate_peek_response(
        _testbed_response(room),
        room_id=room.room_id,
        supported_versions=KNOWN_ROOM_VERSIONS,
        keys=TB_KEYS,
    )
    assert peek.latest_event_id == room.latest()[0]
    current = {
        (p["type"], p["state_key"]): compute_event_id(p, room.rules) for p in room.current_state()
    }
    assert peek.state == current
    assert peek.auth_chain_ids == room.auth_chain_ids(room.current_state())


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"encrypted": True}, "the room is encrypted"),
        ({"history_visibility": "shared"}, "history_visibility is 'shared'"),
        ({"history_visibility": "joined"}, "history_visibility is 'joined'"),
    ],
)
def test_testbed_unpeekable_rooms(options: dict[str, Any], match: str) -> None:
    room = _testbed_room("12", **options)
    with pytest.raises(RoomNotPeekable, match=match):
        validate_peek_response(
            _testbed_response(room),
            room_id=room.room_id,
            supported_versions=KNOWN_ROOM_VERSIONS,
            keys=TB_KEYS,
        )


def test_a_few_hundred_pdus_are_fast() -> None:
    extra = [
        {"type": "org.example.state", "state_key": str(i), "content": {"i": i}} for i in range(400)
    ]
    room = _testbed_room("12", initial_state=extra)
    body = _testbed_response(room)
    assert len(peek_response_pdus(body)) > 400
    start = time.perf_counter()
    peek = validate_peek_response(
        body, room_id=room.room_id, supported_versions=KNOWN_ROOM_VERSIONS, keys=TB_KEYS
    )
    elapsed = time.perf_counter() - start
    assert len(peek.state) > 400
    assert elapsed < 2.0, f"{elapsed:.2f}s for {len(peek.events)} events"

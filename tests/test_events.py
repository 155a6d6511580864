"""Event algorithms: canonical JSON, redaction, content hash, reference hash, event/room IDs.

Spec test vectors (federation.md §9, APPX §Cryptographic Test Vectors), small redaction cases
per room version (federation.md §3.4), and every event of the real Synapse fixture rooms
(read at run time from ``tests/fixtures/synapse-pdus``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from canonicaljson import encode_canonical_json
from hypothesis import given, settings
from hypothesis import strategies as st
from signedjson.key import decode_signing_key_base64, encode_verify_key_base64, get_verify_key
from unpaddedbase64 import decode_base64, encode_base64

from peekproxy.core.canonical_json import (
    MAX_SAFE_INTEGER,
    CanonicalJSONError,
    check_canonical,
    check_canonical_numbers,
    encode_canonical,
    loads_strict,
)
from peekproxy.core.events import (
    compute_event_id,
    content_hash,
    content_hash_input,
    event_id_from_reference_hash,
    hash_inputs,
    redact,
    reference_hash,
    reference_hash_input,
    room_id_for_create,
)
from peekproxy.core.room_versions import KNOWN_ROOM_VERSIONS, RoomVersion, room_version

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "synapse-pdus"
VERSIONS = [str(n) for n in range(1, 13)]

# APPX §Cryptographic Test Vectors: server "domain", key "ed25519:1".
SEED = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"
SIGNING_KEY = decode_signing_key_base64("ed25519", "1", SEED)


def _fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text("utf-8"))
    return data


def _sign(data: bytes) -> str:
    return encode_base64(SIGNING_KEY.sign(data).signature)


def _hash_and_sign(event: dict[str, Any], rules: RoomVersion) -> dict[str, Any]:
    """The spec's event-signing algorithm (APPX §Signing Events), built from our parts."""
    event = copy.deepcopy(event)
    event["hashes"] = {"sha256": encode_base64(content_hash(event))}
    signature = _sign(reference_hash_input(redact(event, rules)))
    event.setdefault("signatures", {}).setdefault("domain", {})["ed25519:1"] = signature
    return event


# --- spec vectors ---------------------------------------------------------------------------


def test_spec_key_pair() -> None:
    public = encode_verify_key_base64(get_verify_key(SIGNING_KEY))
    assert public == "XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI"


@pytest.mark.parametrize(
    ("value", "signature"),
    [
        (
            {},
            "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ",
        ),
        (
            {"one": 1, "two": "Two"},
            "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw",
        ),
    ],
)
def test_spec_json_signing_vectors(value: dict[str, Any], signature: str) -> None:
    assert _sign(encode_canonical(value)) == signature


MINIMAL_EVENT: dict[str, Any] = {
    "room_id": "!x:domain",
    "sender": "@a:domain",
    "origin": "domain",
    "origin_server_ts": 1000000,
    "signatures": {},
    "hashes": {},
    "type": "X",
    "content": {},
    "prev_events": [],
    "auth_events": [],
    "depth": 3,
    "unsigned": {"age_ts": 1000000},
}
MINIMAL_HASH = "5jM4wQpv6lnBo7CLIghJuHdW+s2CMBJPUOGOC89ncos"
MINIMAL_SIG = (
    "KxwGjPSDEtvnFgU00fwFz+l6d2pJM6XBIaMEn81SXPTRl16AqLAYqfIReFGZlHi5KLjAWbOoMszkwsQma+lYAg"
)


@pytest.mark.parametrize("version", VERSIONS[:10])
def test_spec_minimal_event_v1_to_v10(version: str) -> None:
    signed = _hash_and_sign(MINIMAL_EVENT, room_version(version))
    assert signed["hashes"] == {"sha256": MINIMAL_HASH}
    assert signed["signatures"] == {"domain": {"ed25519:1": MINIMAL_SIG}}
    assert signed["unsigned"] == {"age_ts": 1000000}


def test_spec_minimal_event_under_v11_rules_signs_differently() -> None:
    # v11 redaction drops top-level "origin", so the signed bytes change (federation.md §3.4).
    signed = _hash_and_sign(MINIMAL_EVENT, room_version("11"))
    assert signed["hashes"] == {"sha256": MINIMAL_HASH}
    assert signed["signatures"]["domain"]["ed25519:1"] == (
        "Jxp+1glFcZM+nnHpY0EkedRR7u0VmKsJYGnQqIvqus3UvL5X/p1y6wSkLhGoTBel6MZ9lrMIzUqrjqFquWJKBw"
    )


@pytest.mark.parametrize("version", ["3", "4", "10"])
def test_derived_event_id_of_the_minimal_event(version: str) -> None:
    signed = _hash_and_sign(MINIMAL_EVENT, room_version(version))
    # No '+' or '/' in this hash, so the v3 and v4 forms agree.
    assert compute_event_id(signed, room_version(version)) == (
        "$8yif6p8EqgoSten2BLje9ntKm720NyFLWQv9tn8memc"
    )


def test_spec_message_event() -> None:
    event = {
        "content": {"body": "Here is the message content"},
        "event_id": "$0:domain",
        "origin": "domain",
        "origin_server_ts": 1000000,
        "type": "m.room.message",
        "room_id": "!r:domain",
        "sender": "@u:domain",
        "signatures": {},
        "unsigned": {"age_ts": 1000000},
    }
    signed = _hash_and_sign(event, room_version("1"))
    assert signed["hashes"]["sha256"] == "onLKD1bGljeBWQhWZ1kaP9SorVmRQNdN5aM2JYU2n/g"
    assert signed["signatures"]["domain"]["ed25519:1"] == (
        "Wm+VzmOUOz08Ds+0NTWb1d4CZrVsJSikkeRxh6aCcUwu6pNC78FunoD7KNWzqFn241eYHYMGCA5McEiVPdhzBA"
    )


def test_synapse_minimal_event_needs_redaction_to_add_empty_content() -> None:
    event = {
        "event_id": "$0:domain",
        "origin": "domain",
        "origin_server_ts": 1000000,
        "signatures": {},
        "type": "X",
        "unsigned": {"age_ts": 1000000},
    }
    assert redact(event, room_version("1"))["content"] == {}
    signed = _hash_and_sign(event, room_version("1"))
    assert "content" not in signed  # only the redacted copy gains it
    assert signed["hashes"]["sha256"] == "6tJjLpXtggfke8UxFhAKg82QVkJzvKOVOOSjUDK4ZSI"
    assert signed["signatures"]["domain"]["ed25519:1"] == (
        "2Wptgo4CwmLo/Y8B8qinxApKaCkBG2fjTWB7AbP5Uy+aIbygsSdLOFzvdDjww8zUVKCmI02eP9xtyJxc/cLiBA"
    )


# gomatrixserverlib eventversion_test.go, TestEventIDForRoomVersionV3/V4 (a real jki.re event).
JKI_CREATE = json.loads(
    '{"auth_events": [], "prev_events": [], "type": "m.room.create", '
    '"room_id": "!uXDCzlYgCTHtiWCkEx:jki.re", "sender": "@erikj:jki.re", '
    '"content": {"room_version": "5", "predecessor": '
    '{"room_id": "!gdRMqOrTFdOCYHNwOo:half-shot.uk", '
    '"event_id": "$LP7ROBc4b+cMc1UE9haIz8q5AK2AIW4eJ90FfKLvyZI"}, "creator": "@erikj:jki.re"}, '
    '"depth": 1, "prev_state": [], "state_key": "", "origin": "jki.re", '
    '"origin_server_ts": 1560284621137, '
    '"hashes": {"sha256": "IX6zuNiJpJPNf70BLleL3HSCpjKeq9Uhu7uUpyDjBmc"}, '
    '"signatures": {"jki.re": {"ed25519:auto": "O4IyFfF2PPtGp5uaDm8t57dZbdh8vc8Q64LgCwvzYRVItAMI0ui'
    'sfiAFaxkVT7MRpzh6N2QNN5NMRXZKmgPYDA"}}, "unsigned": {"age": 1321650}}'
)


def test_jki_re_create_event_ids() -> None:
    assert encode_base64(content_hash(JKI_CREATE)) == JKI_CREATE["hashes"]["sha256"]
    v3 = compute_event_id(JKI_CREATE, room_version("3"))
    assert v3 == "$RrGxF28UrHLmoASHndYb9Jb/1SFww2ptmtur9INS438"
    for version in ("4", "5", "10"):
        assert compute_event_id(JKI_CREATE, room_version(version)) == (
            "$RrGxF28UrHLmoASHndYb9Jb_1SFww2ptmtur9INS438"
        )
    # Hypothetical: the same event under v11 rules (create keeps all content, no origin).
    assert compute_event_id(JKI_CREATE, room_version("11")) == (
        "$N6v80PuxJXKlWBWY4TT4LVc68JvUnuyz2AmAykTcJco"
    )


def test_v1_event_content_hash_and_verbatim_event_id() -> None:
    # gomatrixserverlib TestEventIDForRoomVersionV1.
    event = json.loads(
        '{"auth_events":[["$oXL79cT7fFxR7dPH:localhost",{"sha256":"abjkiDSg1RkuZrbj2jZoGMlQaaj1'
        'Ue3Jhi7I7NlKfXY"}],["$IVUsaSkm1LBAZYYh:localhost",{"sha256":"X7RUj46hM/8sUHNBIFkStbOauPv'
        'bDzjSdH4NibYWnko"}],["$VS2QT0EeArZYi8wf:localhost",{"sha256":"k9eM6utkCH8vhLW9/oRsH74jOBS'
        '/6RVK42iGDFbylno"}]],"content":{"name":"test3"},"depth":7,"event_id":"$yvN1b43rlmcOs5fY:l'
        'ocalhost","hashes":{"sha256":"Oh1mwI1jEqZ3tgJ+V1Dmu5nOEGpCE4RFUqyJv2gQXKs"},"origin":"loc'
        'alhost","origin_server_ts":1510854416361,"prev_events":[["$FqI6TVvWpcbcnJ97:localhost",{"'
        'sha256":"upCsBqUhNUgT2/+zkzg8TbqdQpWWKQnZpGJc6KcbUC4"}]],"prev_state":[],"room_id":"!19Mp'
        '0U9hjajeIiw1:localhost","sender":"@test:localhost","signatures":{"localhost":{"ed25519:u9'
        'kP":"5IzSuRXkxvbTp0vZhhXYZeOe+619iG3AybJXr7zfNn/4vHz4TH7qSJVQXSaHHvcTcDodAKHnTG1WDulgO5okA'
        'Q"}},"state_key":"","type":"m.room.name"}'
    )
    assert encode_base64(content_hash(event)) == "Oh1mwI1jEqZ3tgJ+V1Dmu5nOEGpCE4RFUqyJv2gQXKs"
    for version in ("1", "2"):
        assert compute_event_id(event, room_version(version)) == "$yvN1b43rlmcOs5fY:localhost"
    with pytest.raises(ValueError, match="no string 'event_id'"):
        compute_event_id({**event, "event_id": None}, room_version("1"))
    with pytest.raises(ValueError, match="not derived"):
        event_id_from_reference_hash(b"\0" * 32, room_version("2"))


# --- redaction cases per room version (federation.md §3.4 table) ---------------------------


def _redacted_content(version: str, event_type: str, content: dict[str, Any]) -> dict[str, Any]:
    event = {"type": event_type, "content": content, "sender": "@a:x", "room_id": "!r:x"}
    result: dict[str, Any] = redact(event, room_version(version))["content"]
    return result


MEMBER = {
    "membership": "join",
    "displayname": "Alice",
    "join_authorised_via_users_server": "@admin:x",
    "third_party_invite": {"display_name": "alice", "signed": {"mxid": "@a:x", "token": "t"}},
}
POWER_LEVELS = {
    "ban": 50,
    "events": {"m.room.name": 50},
    "events_default": 0,
    "invite": 50,
    "kick": 50,
    "notifications": {"room": 50},
    "redact": 50,
    "state_default": 50,
    "users": {"@a:x": 100},
    "users_default": 0,
}
POWER_LEVELS_KEPT = {k: v for k, v in POWER_LEVELS.items() if k not in ("invite", "notifications")}


@pytest.mark.parametrize("version", VERSIONS)
def test_redaction_table(version: str) -> None:
    n = int(version)
    member: dict[str, Any] = {"membership": "join"}
    if n >= 9:
        member["join_authorised_via_users_server"] = "@admin:x"
    if n >= 11:
        member["third_party_invite"] = {"signed": {"mxid": "@a:x", "token": "t"}}
    assert _redacted_content(version, "m.room.member", MEMBER) == member

    create = {"creator": "@a:x", "room_version": version, "m.federate": False}
    expected_create = create if n >= 11 else {"creator": "@a:x"}
    assert _redacted_content(version, "m.room.create", create) == expected_create

    join_rules = {"join_rule": "restricted", "allow": [{"type": "m.room_membership"}], "x": 1}
    expected_join_rules = {k: v for k, v in join_rules.items() if k != "x"}
    if n < 8:
        del expected_join_rules["allow"]
    assert _redacted_content(version, "m.room.join_rules", join_rules) == expected_join_rules

    expected_power = {**POWER_LEVELS_KEPT, **({"invite": 50} if n >= 11 else {})}
    assert _redacted_content(version, "m.room.power_levels", POWER_LEVELS) == expected_power

    visibility = {"history_visibility": "shared", "other": True}
    expected_visibility = {"history_visibility": "shared"}
    assert _redacted_content(version, "m.room.history_visibility", visibility) == (
        expected_visibility
    )

    aliases = {"aliases": ["#a:x"], "other": 1}
    assert _redacted_content(version, "m.room.aliases", aliases) == (
        {"aliases": ["#a:x"]} if n <= 5 else {}
    )

    redaction = {"redacts": "$e", "reason": "spam"}
    assert _redacted_content(version, "m.room.redaction", redaction) == (
        {"redacts": "$e"} if n >= 11 else {}
    )
    assert _redacted_content(version, "m.room.message", {"body": "hi"}) == {}


@pytest.mark.parametrize("version", VERSIONS)
def test_redaction_top_level_keys(version: str) -> None:
    event = {
        "event_id": "$e:x",
        "type": "m.room.member",
        "room_id": "!r:x",
        "sender": "@a:x",
        "state_key": "@a:x",
        "content": {"membership": "join"},
        "hashes": {"sha256": "h"},
        "signatures": {"x": {"ed25519:1": "s"}},
        "depth": 4,
        "prev_events": [],
        "auth_events": [],
        "origin_server_ts": 1,
        "origin": "x",
        "membership": "join",
        "prev_state": [],
        "redacts": "$other",
        "unsigned": {"age_ts": 1},
        "org.example.extra": True,
    }
    redacted = redact(event, room_version(version))
    legacy = {"origin", "membership", "prev_state"}
    dropped = {"redacts", "unsigned", "org.example.extra"}
    if int(version) >= 11:
        dropped |= legacy
    assert set(redacted) == set(event) - dropped


def test_third_party_invite_without_signed_is_dropped_in_v11() -> None:
    content = {"membership": "invite", "third_party_invite": {"display_name": "a"}}
    assert _redacted_content("11", "m.room.member", content) == {"membership": "invite"}
    content = {"membership": "invite", "third_party_invite": "junk"}
    assert _redacted_content("12", "m.room.member", content) == {"membership": "invite"}


def test_redact_does_not_modify_its_input_and_tolerates_junk() -> None:
    event = {"type": "m.room.member", "content": {"membership": "join", "x": 1}, "unsigned": {}}
    before = copy.deepcopy(event)
    redacted = redact(event, room_version("10"))
    redacted["content"]["membership"] = "leave"
    assert event == before
    for junk in ({"type": 5, "content": {"a": 1}}, {"type": "m.room.create", "content": []}, {}):
        assert redact(junk, room_version("11"))["content"] == {}


# --- the real Synapse fixtures --------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_fixture_events(version: str) -> None:
    data = _fixture(f"v{version}.json")
    rules = room_version(data["room_version"])
    assert rules.identifier == version
    for event in data["events"]:
        pdu = event["pdu"]
        note = event["note"]
        assert compute_event_id(pdu, rules) == event["event_id"], note
        assert encode_base64(content_hash(pdu)) == event["content_hash"], note
        assert (encode_base64(content_hash(pdu)) == pdu["hashes"]["sha256"]) is event["hash_ok"]
        assert encode_base64(reference_hash(pdu, rules)) == event["reference_hash"], note
        assert redact(pdu, rules) == event["redacted_pdu"], note
        assert redact(event["redacted_pdu"], rules) == event["redacted_pdu"], note  # idempotent
        hashed, redacted, signed = hash_inputs(pdu, rules)
        assert hashed == content_hash_input(pdu)
        assert redacted == event["redacted_pdu"]
        assert signed == reference_hash_input(event["redacted_pdu"])
        if "pdu_before_redaction" in event:
            # The served redacted message is exactly the redaction of the original.
            assert redact(event["pdu_before_redaction"], rules) == pdu


@pytest.mark.parametrize("version", VERSIONS)
def test_fixture_tampered_event_ids(version: str) -> None:
    data = _fixture(f"v{version}.tampered.json")
    rules = room_version(data["room_version"])
    for case in data["cases"]:
        assert compute_event_id(case["pdu"], rules) == case["event_id"], case["case"]
        hash_matches = encode_base64(content_hash(case["pdu"])) == case["pdu"]["hashes"]["sha256"]
        assert hash_matches is case["hash_ok"], case["case"]
        if "redacted_pdu" in case:
            assert redact(case["pdu"], rules) == case["redacted_pdu"], case["case"]


def test_v12_room_id_is_derived_from_the_create_event() -> None:
    data = _fixture("v12.json")
    rules = room_version("12")
    create = data["events"][0]["pdu"]
    assert create["type"] == "m.room.create" and "room_id" not in create
    assert room_id_for_create(create, rules) == data["room_id"]
    assert data["room_id"] == "!" + data["events"][0]["event_id"][1:]
    assert all(e["pdu"]["room_id"] == data["room_id"] for e in data["events"][1:])
    with pytest.raises(ValueError, match="must not have a room_id"):
        room_id_for_create({**create, "room_id": data["room_id"]}, rules)
    with pytest.raises(ValueError, match=r"not an m\.room\.create"):
        room_id_for_create(data["events"][1]["pdu"], rules)


def test_older_room_ids_come_from_the_create_event() -> None:
    data = _fixture("v11.json")
    assert room_id_for_create(data["events"][0]["pdu"], room_version("11")) == data["room_id"]
    with pytest.raises(ValueError, match="no string room_id"):
        room_id_for_create({"type": "m.room.create"}, room_version("11"))


# --- canonical JSON ------------------------------------------------------------------------

# APPX §Canonical JSON examples (the one with -0 and 1e10 needs value normalisation that
# stdlib json does not do; strict parsing rejects 1e10 instead, see below).
CANONICAL_EXAMPLES = [
    ("{}", "{}"),
    ('{"one": 1, "two": "Two"}', '{"one":1,"two":"Two"}'),
    ('{"b": "2", "a": "1"}', '{"a":"1","b":"2"}'),
    ('{"b":"2","a":"1"}', '{"a":"1","b":"2"}'),
    (
        '{"auth": {"success": true, "mxid": "@john.doe:example.com", "profile": {"display_name":'
        ' "John Doe", "three_pids": [{"medium": "email", "address": "john.doe@example.org"}, '
        '{"medium": "msisdn", "address": "123456789"}]}}}',
        '{"auth":{"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe",'
        '"three_pids":[{"address":"john.doe@example.org","medium":"email"},{"address":'
        '"123456789","medium":"msisdn"}]},"success":true}}',
    ),
    ('{"a": "日本語"}', '{"a":"日本語"}'),
    ('{"本": 2, "日": 1}', '{"日":1,"本":2}'),
    ('{"a": "\\u65E5"}', '{"a":"日"}'),
    ('{"a": null}', '{"a":null}'),
    ('{"ｱ": 1, "🎉": 2, "a": "\\u0001\\u007f\\u2028"}', '{"a":"\\u0001\x7f\u2028","ｱ":1,"🎉":2}'),
]


@pytest.mark.parametrize(("text", "expected"), CANONICAL_EXAMPLES)
def test_canonical_examples(text: str, expected: str) -> None:
    assert encode_canonical(loads_strict(text, canonical=True)) == expected.encode()


def test_loads_strict_rejects_what_cannot_be_signed() -> None:
    bad: list[tuple[str | bytes, str]] = [
        ("NaN", "NaN"),
        ('{"a": Infinity}', "Infinity"),
        ('{"a": -Infinity}', "Infinity"),
        ('{"a": 1, "a": 2}', "duplicate key 'a'"),
        ('{"a": {"b": 1, "b": 1}}', "duplicate key 'b'"),
        ('"\\ud800"', "lone surrogate"),
        ('{"\\udfff": 1}', "lone surrogate"),
        (b'"\xff"', "not UTF-8"),
        ("[1, 2", "invalid JSON"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ]
    for text, message in bad:
        with pytest.raises(CanonicalJSONError, match=message):
            loads_strict(text)
    with pytest.raises(CanonicalJSONError, match="lone surrogate"):
        loads_strict("\ud800")
    with pytest.raises(CanonicalJSONError, match="bytes or str"):
        loads_strict(5)  # type: ignore[arg-type]


def test_loads_strict_canonical_mode() -> None:
    assert loads_strict('"\\ud83c\\udf89"') == "🎉"  # a surrogate *pair* is fine
    assert loads_strict(b'{"a": 1.5, "b": 9007199254740992}') == {"a": 1.5, "b": 2**53}
    for text, message in [
        ('{"a": 1.5}', "float"),
        ('{"a": 1e10}', "float"),
        ('{"a": 9007199254740992}', "out of range"),
        ('{"a": [-9007199254740992]}', "out of range"),
    ]:
        with pytest.raises(CanonicalJSONError, match=message):
            loads_strict(text, canonical=True)
    assert loads_strict('{"a": -9007199254740991}', canonical=True) == {"a": -MAX_SAFE_INTEGER}


def test_check_canonical() -> None:
    assert check_canonical({"a": [1, True, None, "x", {"b": -MAX_SAFE_INTEGER}]}) is None
    assert check_canonical({"a": {"b": [0.0]}}) == "Bad JSON value: float"
    assert check_canonical([MAX_SAFE_INTEGER + 1]) == "JSON integer out of range"
    assert check_canonical({"a": "\udc00"}) is not None
    assert check_canonical({"\ud800": 1}) is not None
    assert check_canonical({1: 2}) == "JSON object key is not a string"
    assert check_canonical({"a": (1, 2)}) == "not a JSON value: tuple"
    nested: Any = []
    for _ in range(100_000):
        nested = [nested]
    assert check_canonical(nested) == "JSON value nested too deeply"
    assert check_canonical_numbers(nested) == "JSON value nested too deeply"
    assert check_canonical_numbers({"a": ["\ud800", 1.5]}) == "Bad JSON value: float"


def test_encode_canonical_refuses_unencodable_values() -> None:
    for value, error in [
        ({"a": float("nan")}, ValueError),
        ({"a": "\ud800"}, UnicodeEncodeError),
        ({"a": object()}, TypeError),
    ]:
        with pytest.raises(error):
            encode_canonical(value)


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-MAX_SAFE_INTEGER, max_value=MAX_SAFE_INTEGER)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=25,
)


@given(_json_values)
def test_canonical_round_trip(value: Any) -> None:
    encoded = encode_canonical(value)
    assert encoded == encode_canonical_json(value)  # same bytes as the canonicaljson library
    assert check_canonical(value) is None and check_canonical_numbers(value) is None
    assert loads_strict(encoded, canonical=True) == value
    assert encode_canonical(json.loads(json.dumps(value, indent=2))) == encoded


_events = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            [
                "m.room.member",
                "m.room.create",
                "m.room.join_rules",
                "m.room.power_levels",
                "m.room.history_visibility",
                "m.room.aliases",
                "m.room.redaction",
                "m.room.message",
            ]
        ),
        "content": st.dictionaries(
            st.sampled_from(
                [
                    *("membership", "creator", "allow", "join_rule", "invite", "users"),
                    *("redacts", "aliases", "third_party_invite", "body"),
                    "join_authorised_via_users_server",
                ]
            ),
            _json_values,
        ),
    },
    optional={"origin": st.text(), "unsigned": _json_values, "extra": _json_values},
)


@settings(max_examples=200)
@given(_events, st.sampled_from(VERSIONS))
def test_redaction_is_idempotent_and_hashes_are_stable(event: dict[str, Any], version: str) -> None:
    rules = KNOWN_ROOM_VERSIONS[version]
    once = redact(event, rules)
    assert redact(once, rules) == once
    assert "content" in once and "unsigned" not in once
    assert reference_hash(event, rules) == reference_hash(once, rules)
    assert len(decode_base64(compute_event_id(event, room_version("4"))[1:])) == 32

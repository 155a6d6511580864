"""PDU receipt checks 1-3 (SSAPI §Checks performed on receipt of a PDU).

The real Synapse fixtures (all room versions, tampered cases, peek responses) are read at run
time from ``tests/fixtures/synapse-pdus``; the rest are PDUs built and signed
here with throwaway keys.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey
from signedjson.key import decode_verify_key_bytes
from unpaddedbase64 import decode_base64, encode_base64

from peekproxy.core.events import content_hash, redact, reference_hash_input
from peekproxy.core.pdu import PduVerdict, check_pdu, check_pdus
from peekproxy.core.pdu_format import MAX_PDU_BYTES
from peekproxy.core.pdu_signatures import (
    KeyLookup,
    VerifyKeyInfo,
    key_table,
    required_signers,
    signer_key_validity,
)
from peekproxy.core.room_versions import RoomVersion, room_version

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "synapse-pdus"
VERSIONS = [str(n) for n in range(1, 13)]
#: The fixtures' word for the spec's "dropped" is "drop"; ours is "reject".
OUTCOME = {"accept": "accept", "redact": "redact", "drop": "reject"}


def _fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text("utf-8"))
    return data


def _fixture_keys(server_name: str, verify_keys: dict[str, str]) -> KeyLookup:
    return key_table(
        {(server_name, kid): VerifyKeyInfo.from_base64(key) for kid, key in verify_keys.items()}
    )


# --- the real Synapse fixtures --------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_fixture_rooms(version: str) -> None:
    data = _fixture(f"v{version}.json")
    rules = room_version(data["room_version"])
    keys = _fixture_keys(data["server_name"], data["verify_keys"])
    outcomes = []
    for event in data["events"]:
        verdict = check_pdu(event["pdu"], rules, keys)
        outcomes.append(verdict.outcome)
        assert verdict.event_id == event["event_id"], event["note"]
        assert verdict.outcome == OUTCOME[event["expected_outcome"]], (event["note"], verdict)
        if verdict.outcome == "accept":
            assert verdict.reason == "ok" and verdict.pdu == event["pdu"]
        else:
            assert verdict.reason == "content hash mismatch"
            assert verdict.pdu == event["redacted_pdu"]
        if "pdu_before_redaction" in event:
            before = check_pdu(event["pdu_before_redaction"], rules, keys)
            assert (before.outcome, before.event_id) == ("accept", event["event_id"])
    assert outcomes.count("redact") == 1  # the message served already redacted


@pytest.mark.parametrize("version", VERSIONS)
def test_fixture_tampered_cases(version: str) -> None:
    data = _fixture(f"v{version}.tampered.json")
    rules = room_version(data["room_version"])
    keys = _fixture_keys(data["server_name"], data["verify_keys"])
    for case in data["cases"]:
        verdict = check_pdu(case["pdu"], rules, keys)
        label = f"case {case['case']}: {case['title']}"
        assert verdict.outcome == OUTCOME[case["expected_outcome"]], (label, verdict)
        assert verdict.event_id == case["event_id"], label
        if verdict.outcome == "redact":
            assert verdict.pdu == case["redacted_pdu"], label
        if verdict.outcome == "reject":
            assert verdict.pdu is None
            if not case["signature_ok"] and case["canonical_json_ok"]:
                assert verdict.reason.startswith(f"no valid signature from {data['server_name']}")


@pytest.mark.parametrize("version", ["10", "12"])
def test_peek_responses(version: str) -> None:
    data = _fixture(f"peek-response-v{version}.json")
    meta = data["_fixture"]
    rules = room_version(data["room_version"])
    keys = _fixture_keys(meta["server_name"], meta["verify_keys"])

    def ids(pdus: list[dict[str, Any]]) -> list[str | None]:
        verdicts = check_pdus(pdus, rules, keys)
        assert all(v.outcome == "accept" for v in verdicts), verdicts
        return [v.event_id for v in verdicts]

    assert ids(data["state"]) == meta["state_event_ids"]
    assert ids(data["auth_chain"]) == meta["auth_chain_event_ids"]
    assert ids([data["latest_event"]]) == [meta["latest_event_id"]]


def test_fixture_required_signers() -> None:
    for version in VERSIONS:
        data = _fixture(f"v{version}.json")
        rules = room_version(version)
        for event in data["events"]:
            assert required_signers(event["pdu"], rules) == {data["server_name"]}


# --- PDUs signed here -----------------------------------------------------------------------

NOW = 1_700_000_000_000


class Server:
    """A throwaway homeserver key: signs PDUs, publishes a VerifyKeyInfo."""

    def __init__(self, name: str, version: str = "k1") -> None:
        self.name = name
        self.key_id = f"ed25519:{version}"
        self.signing_key = SigningKey.generate()

    def info(self, **validity: int | None) -> VerifyKeyInfo:
        return VerifyKeyInfo(self.signing_key.verify_key, **validity)

    def sign(self, pdu: dict[str, Any], rules: RoomVersion) -> None:
        signature = self.signing_key.sign(reference_hash_input(redact(pdu, rules))).signature
        pdu.setdefault("signatures", {}).setdefault(self.name, {})[self.key_id] = encode_base64(
            signature
        )


ALPHA = Server("alpha.test")
BETA = Server("beta.test:8448")


def _keys(*entries: tuple[Server, VerifyKeyInfo]) -> KeyLookup:
    return key_table({(server.name, server.key_id): info for server, info in entries})


KEYS = _keys((ALPHA, ALPHA.info()), (BETA, BETA.info()))


#: A field value meaning "leave this key out of the PDU".
_ABSENT = object()


def make_pdu(
    rules: RoomVersion,
    *,
    signers: tuple[Server, ...] = (ALPHA,),
    sender: str = "@alice:alpha.test",
    **fields: Any,
) -> dict[str, Any]:
    """A hashed and signed PDU in ``rules``' format; ``fields`` override the defaults."""
    pdu: dict[str, Any] = {
        "type": "m.room.message",
        "content": {"body": "hello", "msgtype": "m.text"},
        "sender": sender,
        "room_id": "!room:alpha.test",
        "origin_server_ts": NOW,
        "depth": 5,
        "prev_events": [],
        "auth_events": [],
        "signatures": {},
    }
    if rules.format.room_id_is_create_event_hash:
        pdu["room_id"] = "!" + "A" * 43
    if rules.signatures.event_id_server_signs:
        pdu["event_id"] = "$abc:alpha.test"
    pdu.update(fields)
    pdu = {k: v for k, v in pdu.items() if v is not _ABSENT}
    try:
        pdu["hashes"] = {"sha256": encode_base64(content_hash(pdu))}
    except (ValueError, TypeError):  # unencodable on purpose: cannot be hashed or signed
        pdu["hashes"] = {"sha256": "A" * 43}
        return pdu
    for server in signers:
        server.sign(pdu, rules)
    return pdu


@pytest.mark.parametrize("version", VERSIONS)
def test_signed_here_is_accepted(version: str) -> None:
    rules = room_version(version)
    verdict = check_pdu(make_pdu(rules), rules, KEYS)
    assert (verdict.outcome, verdict.reason) == ("accept", "ok"), verdict
    assert verdict.event_id is not None and verdict.accepted


def test_content_tampering_redacts_and_keeps_the_event_id() -> None:
    rules = room_version("10")
    pdu = make_pdu(rules)
    original = check_pdu(pdu, rules, KEYS)
    pdu["content"]["body"] = "tampered"
    verdict = check_pdu(pdu, rules, KEYS)
    assert (verdict.outcome, verdict.reason) == ("redact", "content hash mismatch")
    assert verdict.event_id == original.event_id
    assert verdict.pdu is not None and verdict.pdu["content"] == {}
    assert "signatures" in verdict.pdu and "hashes" in verdict.pdu
    assert pdu["content"]["body"] == "tampered"  # the input is not modified


def test_url_safe_or_padded_content_hash_is_tolerated() -> None:
    rules = room_version("10")
    pdu = make_pdu(rules)
    raw = decode_base64(pdu["hashes"]["sha256"])
    pdu["hashes"]["sha256"] = encode_base64(raw, urlsafe=True) + "="
    pdu["signatures"] = {}
    ALPHA.sign(pdu, rules)
    assert check_pdu(pdu, rules, KEYS).outcome == "accept"
    pdu["hashes"]["sha256"] = "!!!"
    pdu["signatures"] = {}
    ALPHA.sign(pdu, rules)
    assert check_pdu(pdu, rules, KEYS).outcome == "redact"


def test_unknown_and_unsupported_keys_are_skipped() -> None:
    rules = room_version("10")
    pdu = make_pdu(rules)
    pdu["signatures"]["alpha.test"]["ed25519:unknown"] = pdu["signatures"]["alpha.test"][
        ALPHA.key_id
    ]
    pdu["signatures"]["alpha.test"]["curve25519:x"] = "AAAA"
    pdu["signatures"]["other.test"] = {"ed25519:x": "junk"}  # not a required signer
    assert check_pdu(pdu, rules, KEYS).outcome == "accept"

    verdict = check_pdu(pdu, rules, _keys())
    assert verdict.outcome == "reject"
    assert verdict.reason == (
        f"no valid signature from alpha.test ({ALPHA.key_id}: unknown key; "
        "ed25519:unknown: unknown key; curve25519:x: unsupported algorithm)"
    )


def test_every_usable_signature_must_verify() -> None:
    rules = room_version("10")
    pdu = make_pdu(rules)
    other = Server("alpha.test", "k2")
    pdu["signatures"]["alpha.test"][other.key_id] = pdu["signatures"]["alpha.test"][ALPHA.key_id]
    keys = _keys((ALPHA, ALPHA.info()), (other, other.info()))
    verdict = check_pdu(pdu, rules, keys)
    assert verdict.outcome == "reject"
    assert verdict.reason == f"no valid signature from alpha.test ({other.key_id}: bad signature)"


def test_missing_or_garbled_signature() -> None:
    rules = room_version("10")
    pdu = make_pdu(rules, signers=())
    assert check_pdu(pdu, rules, KEYS).reason == "not signed by alpha.test"
    pdu["signatures"] = {"alpha.test": {ALPHA.key_id: "not base64 at all!"}}
    assert check_pdu(pdu, rules, KEYS).reason.endswith("(ed25519:k1: bad signature)")
    pdu["signatures"] = {"alpha.test": {ALPHA.key_id: "é"}}
    assert check_pdu(pdu, rules, KEYS).outcome == "reject"


@pytest.mark.parametrize("version", VERSIONS)
def test_key_validity(version: str) -> None:
    rules = room_version(version)
    pdu = make_pdu(rules)

    def outcome(**validity: int | None) -> str:
        return check_pdu(pdu, rules, _keys((ALPHA, ALPHA.info(**validity)))).outcome

    # valid_until_ts counts from v5 (rooms/v5 §Signing key validity period); ≥ is enough.
    assert outcome(valid_until_ts=NOW) == "accept"
    assert outcome(valid_until_ts=NOW - 1) == ("reject" if int(version) >= 5 else "accept")
    # A retired key counts only for events sent before it expired, in every version.
    assert outcome(expired_ts=NOW + 1) == "accept"
    assert outcome(expired_ts=NOW) == "reject"
    if int(version) >= 5:
        reason = check_pdu(pdu, rules, _keys((ALPHA, ALPHA.info(valid_until_ts=0)))).reason
        assert (
            reason
            == "no valid signature from alpha.test (ed25519:k1: key not valid at origin_server_ts)"
        )


@pytest.mark.parametrize("version", VERSIONS)
def test_signer_key_validity_is_the_newest_event_per_signer(version: str) -> None:
    rules = room_version(version)
    pdus = [
        make_pdu(rules, origin_server_ts=NOW + 5),
        make_pdu(rules, origin_server_ts=NOW + 9),
        make_pdu(rules, signers=(BETA,), sender="@bob:beta.test:8448", origin_server_ts=NOW),
        "not a PDU",
    ]
    expected = {"alpha.test": NOW + 9, "beta.test:8448": NOW}
    assert signer_key_validity(pdus, rules) == (expected if int(version) >= 5 else {})


def test_signedjson_verify_keys_work_too() -> None:
    rules = room_version("12")
    key = decode_verify_key_bytes(ALPHA.key_id, bytes(ALPHA.signing_key.verify_key))
    keys = key_table({(ALPHA.name, ALPHA.key_id): VerifyKeyInfo(key, None, None)})
    assert check_pdu(make_pdu(rules), rules, keys).outcome == "accept"


@pytest.mark.parametrize("version", ["1", "2"])
def test_v1_v2_event_id_server_must_sign(version: str) -> None:
    rules = room_version(version)
    pdu = make_pdu(rules, event_id="$abc:beta.test:8448")
    assert required_signers(pdu, rules) == {"alpha.test", "beta.test:8448"}
    assert check_pdu(pdu, rules, KEYS).reason == "not signed by beta.test:8448"
    pdu = make_pdu(rules, event_id="$abc:beta.test:8448", signers=(ALPHA, BETA))
    assert check_pdu(pdu, rules, KEYS).outcome == "accept"
    assert required_signers(pdu, room_version("3")) == {"alpha.test"}


def _join(authoriser: str | None) -> dict[str, Any]:
    content: dict[str, Any] = {"membership": "join"}
    if authoriser is not None:
        content["join_authorised_via_users_server"] = authoriser
    return {"type": "m.room.member", "state_key": "@alice:alpha.test", "content": content}


@pytest.mark.parametrize("version", VERSIONS)
def test_restricted_join_needs_the_authorising_server(version: str) -> None:
    rules = room_version(version)
    pdu = make_pdu(rules, **_join("@admin:beta.test:8448"))
    if int(version) < 8:
        assert required_signers(pdu, rules) == {"alpha.test"}
        assert check_pdu(pdu, rules, KEYS).outcome == "accept"
        return
    assert required_signers(pdu, rules) == {"alpha.test", "beta.test:8448"}
    assert check_pdu(pdu, rules, KEYS).reason == "not signed by beta.test:8448"
    pdu = make_pdu(rules, signers=(ALPHA, BETA), **_join("@admin:beta.test:8448"))
    assert check_pdu(pdu, rules, KEYS).outcome == "accept"
    bad = make_pdu(rules, **_join("admin"))
    verdict = check_pdu(bad, rules, KEYS)
    assert verdict.outcome == "reject" and "join_authorised_via_users_server" in verdict.reason
    # Only joins: a leave carrying the key needs no second signature.
    leave = _join("@admin:beta.test:8448")
    leave["content"]["membership"] = "leave"
    assert check_pdu(make_pdu(rules, **leave), rules, KEYS).outcome == "accept"


def test_third_party_invite_is_exempt_from_the_sender_signature() -> None:
    rules = room_version("10")
    invite: dict[str, Any] = {
        "type": "m.room.member",
        "state_key": "@carol:beta.test:8448",
        "content": {"membership": "invite", "third_party_invite": {"signed": {}}},
    }
    pdu = make_pdu(rules, signers=(BETA,), **invite)
    assert required_signers(pdu, rules) == set()
    assert check_pdu(pdu, rules, KEYS).outcome == "accept"


def test_required_signers_never_raises() -> None:
    rules = room_version("9")
    junks: list[Any] = [{}, {"sender": 5}, {"sender": "nocolon"}, {"content": []}, [], None]
    for junk in junks:
        assert required_signers(junk, rules) == set()
    assert required_signers({"sender": "@a:x", **_join("junk")}, rules) == {"x"}


# --- step 1: format -------------------------------------------------------------------------


def _reason(rules: RoomVersion, pdu: Any) -> str:
    verdict = check_pdu(pdu, rules, KEYS)
    assert verdict.outcome == "reject" and verdict.pdu is None, verdict
    return verdict.reason


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"type": _ABSENT}, "missing or invalid 'type' (must be a string)"),
        ({"type": 5}, "missing or invalid 'type' (must be a string)"),
        ({"content": "x"}, "missing or invalid 'content' (must be an object)"),
        ({"sender": _ABSENT}, "missing or invalid 'sender' (must be a string)"),
        ({"sender": "alice"}, "invalid 'sender': user ID must start with '@'"),
        ({"depth": True}, "missing or invalid 'depth' (must be an integer)"),
        ({"depth": -1}, "'depth' is out of range"),
        ({"origin_server_ts": "1"}, "missing or invalid 'origin_server_ts' (must be an integer)"),
        ({"origin_server_ts": 2**53}, "'origin_server_ts' is out of range"),
        ({"prev_events": {}}, "missing or invalid 'prev_events' (must be a list)"),
        ({"auth_events": ["x"]}, "invalid 'auth_events' (must be a list of event IDs"),
        ({"room_id": _ABSENT}, "missing or invalid 'room_id' (must be a string)"),
        ({"room_id": "!" + "A" * 43}, "'room_id' must be !opaque:server in room version 11"),
        ({"state_key": 1}, "invalid 'state_key' (must be a string)"),
        ({"state_key": "é" * 128}, "'state_key' is longer than 255 bytes"),
        ({"type": "x" * 256}, "'type' is longer than 255 bytes"),
        ({"content": {"n": 1.5}}, "Bad JSON value: float"),
        ({"content": {"s": "\ud800"}}, "not valid JSON for hashing: string is not valid Unicode"),
        ({"content": {"n": float("nan")}}, "not valid JSON for hashing: Out of range float"),
        ({"content": {"o": object()}}, "not valid JSON for hashing: Object of type object"),
    ],
)
def test_format_rejections(fields: dict[str, Any], reason: str) -> None:
    rules = room_version("11")
    pdu = make_pdu(room_version("10"), **{k: v for k, v in fields.items() if k != "unsigned"})
    if "unsigned" in fields:
        pdu["unsigned"] = fields["unsigned"]
    assert _reason(rules, pdu).startswith(reason)


@pytest.mark.parametrize(
    "unsigned",
    [{"age": 2**53}, {"age": 1.5}, {"s": "\ud800"}, {"blob": "x" * 70_000}, "not an object"],
)
def test_unsigned_is_ignored(unsigned: Any) -> None:
    """Neither hashed nor signed, so a relaying server could change it: it must not get a
    genuine event rejected, and it is not kept."""
    rules = room_version("10")
    pdu = make_pdu(rules)
    verdict = check_pdu({**pdu, "unsigned": unsigned}, rules, KEYS)
    assert verdict.outcome == "accept", verdict.reason
    assert verdict.pdu is not None and "unsigned" not in verdict.pdu
    assert verdict.event_id == check_pdu(pdu, rules, KEYS).event_id


def test_hashes_and_signatures_shape() -> None:
    rules = room_version("10")
    pdu = make_pdu(rules)
    assert _reason(rules, {**pdu, "hashes": {}}) == ("invalid 'hashes' (must hold a sha256 string)")
    assert _reason(rules, {**pdu, "hashes": []}).startswith("missing or invalid 'hashes'")
    assert _reason(rules, {**pdu, "signatures": {"x": "y"}}).startswith("invalid 'signatures'")
    assert _reason(rules, {**pdu, "signatures": {"x": {"k": 1}}}).startswith("invalid 'signatures'")
    assert _reason(rules, {**pdu, "signatures": {"\ud800": {}}}).startswith(
        "not valid JSON for hashing"
    )


def test_byte_limits_start_with_v11() -> None:
    # 200 two-byte characters: within 255 code points, over 255 bytes.
    for version, outcome in (("10", "accept"), ("11", "reject"), ("12", "reject")):
        rules = room_version(version)
        pdu = make_pdu(rules, type="é" * 200, state_key="")
        assert check_pdu(pdu, rules, KEYS).outcome == outcome, version
    rules = room_version("10")
    assert _reason(rules, make_pdu(rules, state_key="x" * 256)) == (
        "'state_key' is longer than 255 characters"
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_strict_canonical_json_from_v6(version: str) -> None:
    rules = room_version(version)
    for extra in ({"ratio": 0.5}, {"big": -(2**53)}):
        pdu = make_pdu(rules, content={"body": "x", **extra})
        assert check_pdu(pdu, rules, KEYS).outcome == ("reject" if int(version) >= 6 else "accept")


def test_size_limit_includes_signatures() -> None:
    rules = room_version("10")
    base = make_pdu(rules, content={"body": ""})
    # Pad the content so that the PDU is exactly at the limit, then one byte over.
    from peekproxy.core.canonical_json import encode_canonical

    padding = MAX_PDU_BYTES - len(encode_canonical(base))
    at_limit = make_pdu(rules, content={"body": "x" * padding})
    assert len(encode_canonical(at_limit)) == MAX_PDU_BYTES
    assert check_pdu(at_limit, rules, KEYS).outcome == "accept"
    over = make_pdu(rules, content={"body": "x" * (padding + 1)})
    assert (
        _reason(rules, over) == f"PDU is {MAX_PDU_BYTES + 1} bytes as canonical JSON (limit 65536)"
    )
    # Signatures count: a small event with a huge signatures block is too big too.
    padded = make_pdu(rules)
    padded["signatures"]["junk.test"] = {f"ed25519:{i}": "A" * 100 for i in range(700)}
    assert _reason(rules, padded).startswith("PDU is ")
    # ...and escapes are counted exactly, not guessed: control characters take 6 bytes.
    tricky = make_pdu(rules, unsigned={"s": "\x01" * 100})
    assert check_pdu(tricky, rules, KEYS).outcome == "accept"


def test_room_ids_in_v12() -> None:
    rules = room_version("12")
    create = make_pdu(rules, type="m.room.create", state_key="", content={}, room_id=_ABSENT)
    verdict = check_pdu(create, rules, KEYS)
    assert verdict.outcome == "accept" and verdict.event_id is not None
    with_room = make_pdu(
        rules, type="m.room.create", state_key="", room_id="!" + verdict.event_id[1:]
    )
    assert _reason(rules, with_room) == (
        "an m.room.create event must not have a 'room_id' in room version 12"
    )
    old_style = make_pdu(rules, room_id="!room:alpha.test")
    assert (
        _reason(rules, old_style) == "'room_id' must be '!' + a reference hash in room version 12"
    )
    assert _reason(rules, make_pdu(rules, room_id=_ABSENT)).startswith(
        "missing or invalid 'room_id'"
    )
    # Before v12 a create event needs its room ID.
    v11 = room_version("11")
    assert _reason(v11, make_pdu(v11, type="m.room.create", room_id=_ABSENT)).startswith(
        "missing or invalid 'room_id'"
    )


@pytest.mark.parametrize("version", ["1", "2"])
def test_v1_format(version: str) -> None:
    rules = room_version(version)
    ok = make_pdu(rules, prev_events=[["$p:alpha.test", {}], ["$q:alpha.test", {"sha256": "x"}]])
    assert check_pdu(ok, rules, KEYS).outcome == "accept"
    assert _reason(rules, make_pdu(rules, prev_events=["$p:alpha.test"])).startswith(
        "invalid 'prev_events' (must be [event_id, hashes] pairs"
    )
    assert _reason(rules, make_pdu(rules, event_id=_ABSENT)) == (
        f"missing or invalid 'event_id' (required in room version {version})"
    )
    assert _reason(rules, make_pdu(rules, event_id="$nocolon")) == (
        f"'event_id' must be $localpart:server in room version {version}"
    )
    verdict = check_pdu(make_pdu(rules, event_id="abc:alpha.test"), rules, KEYS)
    assert verdict.event_id == "abc:alpha.test" and verdict.reason.startswith("invalid 'event_id'")


def test_non_objects_and_mappings() -> None:
    rules = room_version("10")
    junks: list[Any] = [None, [], "x", 5]
    for junk in junks:
        assert check_pdu(junk, rules, KEYS) == PduVerdict(
            None, "reject", "PDU is not a JSON object", None
        )

    class Frozen(dict[str, Any]):
        pass

    pdu = make_pdu(rules)
    assert check_pdu(Frozen(pdu), rules, KEYS).outcome == "accept"
    from types import MappingProxyType

    assert check_pdu(MappingProxyType(pdu), rules, KEYS).outcome == "accept"


def test_deeply_nested_content_is_rejected_not_raised() -> None:
    rules = room_version("10")
    nested: Any = {}
    for _ in range(100_000):
        nested = {"a": nested}
    pdu = make_pdu(rules)
    pdu["content"] = nested
    verdict = check_pdu(pdu, rules, KEYS)
    assert verdict.outcome == "reject" and "nested too deeply" in verdict.reason


def test_verify_key_info_from_base64() -> None:
    info = VerifyKeyInfo.from_base64(encode_base64(bytes(ALPHA.signing_key.verify_key)))
    assert bytes(info.verify_key) == bytes(ALPHA.signing_key.verify_key)
    with pytest.raises(ValueError, match="32 bytes"):
        VerifyKeyInfo.from_base64("AAAA")


# --- never raises ---------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3)
    ),
    max_leaves=10,
)
_keys_of_a_pdu = st.sampled_from(
    [
        *("type", "content", "sender", "room_id", "event_id", "origin_server_ts", "depth"),
        *("hashes", "signatures", "prev_events", "auth_events", "state_key", "unsigned"),
        "redacts",
    ]
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VERSIONS), st.dictionaries(_keys_of_a_pdu, _json), st.data())
def test_check_pdu_never_raises(version: str, changes: dict[str, Any], data: st.DataObject) -> None:
    rules = room_version(version)
    pdu = make_pdu(rules)
    mutated = {**pdu, **changes}
    dropped = data.draw(st.lists(_keys_of_a_pdu, max_size=3))
    for key in dropped:
        mutated.pop(key, None)
    verdict = check_pdu(mutated, rules, KEYS)
    assert verdict.outcome in ("accept", "redact", "reject")
    assert isinstance(verdict.reason, str) and verdict.reason
    assert (verdict.pdu is None) == (verdict.outcome == "reject")
    required_signers(mutated, rules)
    if not changes and not dropped and verdict.outcome != "accept":
        pytest.fail(f"unmodified PDU not accepted: {verdict}")


@settings(max_examples=100)
@given(_json)
def test_check_pdu_never_raises_on_any_json(value: Any) -> None:
    verdict = check_pdu(value, room_version("12"), KEYS)
    assert verdict.outcome == "reject"


def test_redacted_copy_still_verifies() -> None:
    """SSAPI: signatures are checked on the redacted copy, so a redacted event (as stored
    after a content-hash failure) keeps verifying."""
    for version in VERSIONS:
        rules = room_version(version)
        pdu = make_pdu(rules)
        pdu["content"]["body"] = "changed"
        verdict = check_pdu(pdu, rules, KEYS)
        assert verdict.outcome == "redact" and verdict.pdu is not None
        again = check_pdu(copy.deepcopy(verdict.pdu), rules, KEYS)
        assert again.event_id == verdict.event_id
        assert again.outcome == "redact"  # the content hash still covers the original body

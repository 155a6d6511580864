"""``peekproxy pdu check`` as a user runs it (``python -m peekproxy ...`` in a child process)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from nacl.signing import SigningKey
from unpaddedbase64 import encode_base64

from peekproxy.core.events import content_hash, redact, reference_hash_input
from peekproxy.core.room_versions import room_version
from tests.dns import start_dnsmasq
from tests.support import JsonApp, issue_cert, run_cli, serve_app

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "synapse-pdus"
OUTCOME = {"accept": "accept", "redact": "redact", "drop": "reject"}
AUTH = " | auth: "  # what separates the auth verdict (step 4) from steps 1-3


def _fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text("utf-8"))
    return data


def _lines(stdout: str) -> list[tuple[str, str, str]]:
    """(event ID, outcome of steps 1-3, reason) per line, without the auth verdict."""
    parsed = []
    for line in stdout.splitlines():
        event_id, outcome, reason = line.partition(AUTH)[0].split(" ", 2)
        parsed.append((event_id, outcome, reason))
    return parsed


def _auth(stdout: str) -> list[str | None]:
    """The auth verdict per line (``accept``, ``reject <reason>``), ``None`` without one."""
    return [line.partition(AUTH)[2] or None for line in stdout.splitlines()]


def _assert_usage_error(result: Any, message: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("version", ["1", "3", "12"])
def test_fixture_room_exits_1_because_of_the_redacted_message(version: str) -> None:
    data = _fixture(f"v{version}.json")
    result = run_cli("pdu", "check", str(FIXTURES / f"v{version}.json"))
    assert result.returncode == 1, result.stderr
    lines = _lines(result.stdout)
    assert [event_id for event_id, _, _ in lines] == [e["event_id"] for e in data["events"]]
    redacted = [e["event_id"] for e in data["events"] if e["expected_outcome"] == "redact"]
    assert [(i, r) for i, o, r in lines if o != "accept"] == [
        (redacted[0], "content hash mismatch")
    ]
    assert all(reason == "ok" for _, outcome, reason in lines if outcome == "accept")


def test_tampered_file() -> None:
    data = _fixture("v6.tampered.json")
    result = run_cli("pdu", "check", str(FIXTURES / "v6.tampered.json"))
    assert result.returncode == 1
    lines = _lines(result.stdout)
    assert [(i, o) for i, o, _ in lines] == [
        (case["event_id"], OUTCOME[case["expected_outcome"]]) for case in data["cases"]
    ]


def test_peek_response_is_all_accepted() -> None:
    result = run_cli("pdu", "check", str(FIXTURES / "peek-response-v12.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    meta = _fixture("peek-response-v12.json")["_fixture"]
    expected = meta["state_event_ids"] + meta["auth_chain_event_ids"] + [meta["latest_event_id"]]
    assert [i for i, _, _ in _lines(result.stdout)] == expected


def test_key_option_overrides_fixture_keys() -> None:
    data = _fixture("v10.json")
    (key_id,) = data["verify_keys"]
    wrong = encode_base64(bytes(SigningKey.generate().verify_key))
    result = run_cli(
        "pdu",
        "check",
        "--key",
        f"{data['server_name']}:{key_id}:{wrong}",
        str(FIXTURES / "v10.json"),
    )
    assert result.returncode == 1
    reasons = {reason for _, _, reason in _lines(result.stdout)}
    assert reasons == {f"no valid signature from {data['server_name']} ({key_id}: bad signature)"}


def _signed_pdu(server: str, key: SigningKey, version: str) -> dict[str, Any]:
    rules = room_version(version)
    pdu: dict[str, Any] = {
        "type": "m.room.message",
        "content": {"body": "hi"},
        "sender": f"@bob:{server}",
        "room_id": f"!room:{server}",
        "origin_server_ts": 1_700_000_000_000,
        "depth": 3,
        "prev_events": [],
        "auth_events": [],
    }
    pdu["hashes"] = {"sha256": encode_base64(content_hash(pdu))}
    signature = key.sign(reference_hash_input(redact(pdu, rules))).signature
    pdu["signatures"] = {server: {"ed25519:a_b": encode_base64(signature)}}
    return pdu


def test_key_whose_server_name_has_a_port(tmp_path: Path) -> None:
    key = SigningKey.generate()
    pdu = _signed_pdu("localhost:8448", key, "11")
    (tmp_path / "one.json").write_text(json.dumps(pdu))
    (tmp_path / "list.json").write_text(json.dumps([pdu, pdu]))
    key_option = f"localhost:8448:ed25519:a_b:{encode_base64(bytes(key.verify_key))}"
    for name, count in (("one.json", 1), ("list.json", 2)):
        path = str(tmp_path / name)
        result = run_cli(
            "pdu", "check", "--no-auth", "--room-version", "11", "--key", key_option, path
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert [(o, r) for _, o, r in _lines(result.stdout)] == [("accept", "ok")] * count
        assert _auth(result.stdout) == [None] * count  # --no-auth: steps 1-3 only


def test_room_version_option_overrides_the_fixture() -> None:
    # v3 PDUs read as v4: same hashes, but the event IDs use the URL-safe alphabet.
    result = run_cli("pdu", "check", "--room-version", "4", str(FIXTURES / "v3.json"))
    ids = [i for i, _, _ in _lines(result.stdout)]
    assert not any("/" in i or "+" in i for i in ids)
    assert any("_" in i or "-" in i for i in ids)


def test_bad_input_exits_2(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"type": ')
    _assert_usage_error(run_cli("pdu", "check", "--room-version", "10", str(bad_json)), "bad.json")
    dup = tmp_path / "dup.json"
    dup.write_text('{"type": "a", "type": "b"}')
    _assert_usage_error(run_cli("pdu", "check", "--room-version", "10", str(dup)), "duplicate key")
    _assert_usage_error(
        run_cli("pdu", "check", "--room-version", "10", str(tmp_path / "absent.json")),
        "cannot read",
    )
    _assert_usage_error(
        run_cli("pdu", "check", "--room-version", "99", str(FIXTURES / "v1.json")),
        "unknown room version '99'",
    )
    pdu = tmp_path / "pdu.json"
    pdu.write_text(json.dumps(_signed_pdu("a.test", SigningKey.generate(), "10")))
    _assert_usage_error(run_cli("pdu", "check", str(pdu)), "no --room-version")
    scalar = tmp_path / "scalar.json"
    scalar.write_text("42")
    _assert_usage_error(
        run_cli("pdu", "check", "--room-version", "10", str(scalar)), "input must be"
    )


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("a.test:ed25519:AAAA", "expected SERVER:ed25519:ID:BASE64"),
        ("a.test:curve25519:x:AAAA", "only ed25519"),
        ("a.test:ed25519:bad-id:AAAA", "key version"),
        ("bad host:ed25519:x:" + "A" * 43, "bad hostname"),
        ("a.test:ed25519:x:AAAA", "not a base64 ed25519 public key"),
    ],
)
def test_bad_key_option_exits_2(key: str, message: str) -> None:
    _assert_usage_error(run_cli("pdu", "check", "--key", key, str(FIXTURES / "v1.json")), message)


async def test_without_a_key_the_keys_are_fetched_over_federation(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    """The fixture's server (hs-alpha.test) is found through real DNS and serves its real,
    Synapse-signed key document over TLS; pdu check fetches it and verifies the room."""
    fixture = _fixture("v10.json")
    server_name = fixture["server_name"]

    async def key_document(scope: Any, body: bytes) -> tuple[int, Any]:
        return 200, fixture["server_key_response"]

    dns = await start_dnsmasq(nursery, hosts={server_name: "127.10.1.1"})
    await serve_app(
        nursery,
        JsonApp({("GET", "/_matrix/key/v2/server"): key_document}),
        bind="127.10.1.1:18448",
        tls=issue_cert(tls_ca, tmp_path, server_name),
    )
    tls_ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    config = tmp_path / "federation-only.toml"  # only the section pdu check uses
    config.write_text(
        f'[federation]\ndns_nameservers = ["{dns}"]\nip_range_whitelist = ["127.0.0.0/8"]\n'
        f'tls_ca_file = "{tmp_path / "ca.pem"}"\ndefault_port = 18448\n'
    )
    pdus = tmp_path / "pdus.json"  # bare PDUs: no keys in the input
    pdus.write_text(json.dumps([e["pdu"] for e in fixture["events"]]))

    result = await trio.run_process(
        [
            sys.executable,
            "-m",
            "peekproxy",
            "pdu",
            "check",
            "-c",
            str(config),
            "--room-version",
            "10",
            str(pdus),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    lines = _lines(result.stdout.decode())
    assert result.returncode == 1, result.stderr  # the already-redacted message: "redact"
    assert [(e, o) for e, o, _ in lines] == [
        (e["event_id"], e["expected_outcome"]) for e in fixture["events"]
    ]
    # Unreachable server: a clear message, and its events are rejected for want of a key.
    result = await trio.run_process(
        [
            sys.executable,
            "-m",
            "peekproxy",
            "pdu",
            "check",
            "-c",
            str(config),
            "--room-version",
            "10",
            str(pdus),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, "PEEKPROXY_FEDERATION__DEFAULT_PORT": "1"},
    )
    assert result.returncode == 1
    assert f"cannot get keys of {server_name}" in result.stderr.decode()
    assert all(o == "reject" for _, o, _ in _lines(result.stdout.decode()))


def test_empty_input_is_unusable(tmp_path: Path) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    _assert_usage_error(run_cli("pdu", "check", "--room-version", "10", str(empty)), "no PDUs")


def test_reads_standard_input() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "peekproxy", "pdu", "check", "-"],
        input=(FIXTURES / "peek-response-v10.json").read_bytes(),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.decode().splitlines()) == 9 + 4 + 1


# --- the auth verdict (receipt step 4) ------------------------------------------------------


@pytest.mark.parametrize("version", [str(n) for n in range(1, 13)])
def test_synapse_rooms_pass_the_auth_rules(version: str) -> None:
    """Every real Synapse event passes step 4 with the file's events as auth events; the
    redacted message is judged as its redacted copy."""
    result = run_cli("pdu", "check", str(FIXTURES / f"v{version}.json"))
    assert result.returncode == 1  # the already-redacted message, as before
    assert _auth(result.stdout) == ["accept"] * len(_fixture(f"v{version}.json")["events"])


def test_peek_responses_pass_the_auth_rules() -> None:
    for name in ("peek-response-v10.json", "peek-response-v12.json"):
        result = run_cli("pdu", "check", str(FIXTURES / name))
        assert result.returncode == 0, result.stdout + result.stderr
        assert set(_auth(result.stdout)) == {"accept"}


def _illegal_message(fixture: dict[str, Any], key: SigningKey, server: str) -> dict[str, Any]:
    """A message into the fixture's room from a user of ``server``, who never joined; its
    ``auth_events`` cite the room's create event and power levels (as a server would
    choose them), and it is correctly hashed and signed by ``server``."""
    rules = room_version(fixture["room_version"])
    events = [e["pdu"] for e in fixture["events"]]
    ids = {
        (p["type"], p.get("state_key")): e["event_id"]
        for e, p in zip(fixture["events"], events, strict=True)
    }
    pdu: dict[str, Any] = {
        "type": "m.room.message",
        "content": {"msgtype": "m.text", "body": "I am not in this room"},
        "sender": f"@mallory:{server}",
        "room_id": fixture["room_id"],
        "origin_server_ts": events[-1]["origin_server_ts"] + 1,
        "depth": events[-1]["depth"] + 1,
        "prev_events": [fixture["events"][-1]["event_id"]],
        "auth_events": [ids[("m.room.create", "")], ids[("m.room.power_levels", "")]],
    }
    pdu["hashes"] = {"sha256": encode_base64(content_hash(pdu))}
    signature = key.sign(reference_hash_input(redact(pdu, rules))).signature
    pdu["signatures"] = {server: {"ed25519:a_b": encode_base64(signature)}}
    return pdu


def test_an_illegal_event_passes_steps_1_to_3_and_fails_the_auth_rules(tmp_path: Path) -> None:
    fixture = _fixture("v10.json")
    key = SigningKey.generate()
    illegal = tmp_path / "illegal.json"
    illegal.write_text(json.dumps(_illegal_message(fixture, key, "evil.test")))
    key_option = f"evil.test:ed25519:a_b:{encode_base64(bytes(key.verify_key))}"
    args = ["pdu", "check", "--room-version", "10", "--key", key_option]

    # The room's events (a fixture file) as the auth events: rejected by the auth rules.
    result = run_cli(*args, "--auth-events", str(FIXTURES / "v10.json"), str(illegal))
    assert result.returncode == 1, result.stderr
    [(_, outcome, reason)] = _lines(result.stdout)
    assert (outcome, reason) == ("accept", "ok")  # steps 1-3: a well-made event
    [verdict] = _auth(result.stdout)
    assert verdict is not None and verdict.startswith("reject ") and "mallory" in verdict

    # Without them: the cited auth events are not given.
    result = run_cli(*args, str(illegal))
    assert result.returncode == 1
    create_id = fixture["events"][0]["event_id"]
    assert _auth(result.stdout) == [f"reject auth event {create_id} not given"]

    # --no-auth: steps 1-3 alone, the output of before.
    result = run_cli(*args, "--no-auth", str(illegal))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [f"{_lines(result.stdout)[0][0]} accept ok"]


def test_auth_events_from_a_list_of_pdus(tmp_path: Path) -> None:
    """The last event of a real room, checked alone with the others as a JSON list."""
    fixture = _fixture("v12.json")
    *earlier, last = [e["pdu"] for e in fixture["events"]]
    (tmp_path / "auth.json").write_text(json.dumps(earlier))
    (tmp_path / "last.json").write_text(json.dumps(last))
    key = next(iter(fixture["verify_keys"].items()))
    key_option = f"{fixture['server_name']}:{key[0]}:{key[1]}"
    base = ["pdu", "check", "--room-version", "12", "--key", key_option]
    result = run_cli(
        *base, "--auth-events", str(tmp_path / "auth.json"), str(tmp_path / "last.json")
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert _auth(result.stdout) == ["accept"]
    # Without the create event (implied in v12, never cited): not given.
    (tmp_path / "auth.json").write_text(json.dumps(earlier[1:]))
    result = run_cli(
        *base, "--auth-events", str(tmp_path / "auth.json"), str(tmp_path / "last.json")
    )
    assert result.returncode == 1
    create_id = fixture["events"][0]["event_id"]
    assert _auth(result.stdout) == [f"reject auth event {create_id} not given"]

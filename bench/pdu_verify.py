"""Benchmark: full PDU verification against the cryptographic floor.

Run with ``.venv/bin/python bench/pdu_verify.py [--rounds N] [--versions 10,11,12]``.

* **full**: :func:`peekproxy.core.pdu.check_pdu` on every event of the Synapse fixture
  rooms (format and strict canonical-JSON checks, content hash, redaction, reference hash
  and event ID, ed25519 signature verification);
* **with auth rules**: steps 1-3 as *full*, then step 4
  (:func:`peekproxy.core.auth_rules.check_event_auth`, the room's own events as the auth
  events) and step 5 (:func:`~peekproxy.core.auth_rules.check_against_state`, the state
  before each event, as the fixture's order gives it);
* **floor**: for the same events, only what no verifier can avoid: one pynacl
  ``VerifyKey.verify`` of the signature and one ``hashlib.sha256`` over the same
  pre-encoded bytes (everything encoded and decoded before timing).

Prints events/s for each, the ratio full/floor (goal: at least 0.6) and the ratio with
auth/floor (rates, i.e. the floor's time over the time with the auth rules; issue 14's goal:
at least 0.5). The fixtures are read from ``tests/fixtures/synapse-pdus``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from nacl.signing import VerifyKey
from unpaddedbase64 import decode_base64

from peekproxy.core.auth_rules import StateKey, check_against_state, check_event_auth
from peekproxy.core.events import redact, reference_hash_input
from peekproxy.core.pdu import check_pdu
from peekproxy.core.pdu_signatures import KeyLookup, VerifyKeyInfo, key_table
from peekproxy.core.room_versions import RoomVersion, room_version

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "synapse-pdus"
GOAL = 0.6
GOAL_WITH_AUTH = 0.5

Case = tuple[dict[str, Any], RoomVersion, KeyLookup]
#: What steps 4-5 need besides a :data:`Case`: the event ID, the room's events by ID (the
#: auth events) and the state before the event.
AuthInputs = tuple[str, dict[str, dict[str, Any]], dict[StateKey, dict[str, Any]]]


def load(versions: list[str]) -> list[Case]:
    """Every PDU of ``v<N>.json`` for the given versions, with its rules and keys."""
    cases: list[Case] = []
    for version in versions:
        data = json.loads((FIXTURES / f"v{version}.json").read_text("utf-8"))
        rules = room_version(data["room_version"])
        keys = key_table(
            {
                (data["server_name"], key_id): VerifyKeyInfo.from_base64(key)
                for key_id, key in data["verify_keys"].items()
            }
        )
        cases.extend((event["pdu"], rules, keys) for event in data["events"])
    return cases


def auth_inputs(versions: list[str]) -> list[AuthInputs]:
    """Per event of :func:`load` (same order): its ID, its room's events by ID, and the
    state before it (the fold over the fixture's DAG order)."""
    inputs: list[AuthInputs] = []
    for version in versions:
        data = json.loads((FIXTURES / f"v{version}.json").read_text("utf-8"))
        room = {event["event_id"]: event["pdu"] for event in data["events"]}
        state: dict[StateKey, dict[str, Any]] = {}
        for event in data["events"]:
            inputs.append((event["event_id"], room, dict(state)))
            pdu = event["pdu"]
            if "state_key" in pdu:
                state[(pdu["type"], pdu["state_key"])] = pdu
    return inputs


def floor_inputs(cases: list[Case]) -> list[tuple[VerifyKey, bytes, bytes]]:
    """(verify key, signed bytes, signature) per event, all decoded up front."""
    inputs = []
    for pdu, rules, keys in cases:
        message = reference_hash_input(redact(pdu, rules))
        ((server, by_key),) = pdu["signatures"].items()
        ((key_id, signature),) = by_key.items()
        info = keys(server, key_id)
        assert info is not None and isinstance(info.verify_key, VerifyKey)
        inputs.append((info.verify_key, message, decode_base64(signature)))
    return inputs


def time_full(cases: list[Case], rounds: int) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        for pdu, rules, keys in cases:
            check_pdu(pdu, rules, keys)
    return time.perf_counter() - start


def time_with_auth(cases: list[Case], auth: list[AuthInputs], rounds: int) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        for (pdu, rules, keys), (event_id, room, before) in zip(cases, auth, strict=True):
            kept = check_pdu(pdu, rules, keys).pdu or pdu
            check_event_auth(event_id, kept, room, rules)
            check_against_state(event_id, kept, before, rules)
    return time.perf_counter() - start


def time_floor(inputs: list[tuple[VerifyKey, bytes, bytes]], rounds: int) -> float:
    sha256 = hashlib.sha256
    start = time.perf_counter()
    for _ in range(rounds):
        for verify_key, message, signature in inputs:
            verify_key.verify(message, signature)
            sha256(message).digest()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="passes over the events")
    parser.add_argument(
        "--versions", default=",".join(str(n) for n in range(1, 13)), help="e.g. 10,11,12"
    )
    parser.add_argument("--repeat", type=int, default=7, help="measurements; best one counts")
    args = parser.parse_args()

    versions = args.versions.split(",")
    cases = load(versions)
    auth = auth_inputs(versions)
    verdicts = [check_pdu(pdu, rules, keys) for pdu, rules, keys in cases]
    outcomes = {o: sum(v.outcome == o for v in verdicts) for o in ("accept", "redact", "reject")}
    refused = sum(
        check_event_auth(event_id, v.pdu or pdu, room, rules) is not None
        or check_against_state(event_id, v.pdu or pdu, before, rules) is not None
        for (pdu, rules, _), v, (event_id, room, before) in zip(cases, verdicts, auth, strict=True)
    )
    inputs = floor_inputs(cases)
    events = len(cases) * args.rounds
    print(f"{len(cases)} fixture PDUs (room versions {args.versions}) x {args.rounds} rounds")
    print(f"verdicts: {outcomes}; refused by the auth rules (steps 4-5): {refused}")

    full = floor = with_auth = float("inf")
    for _ in range(args.repeat):  # interleaved, so all see the same machine state
        full = min(full, time_full(cases, args.rounds))
        with_auth = min(with_auth, time_with_auth(cases, auth, args.rounds))
        floor = min(floor, time_floor(inputs, args.rounds))
    full_rate, floor_rate, auth_rate = events / full, events / floor, events / with_auth
    ratio = full_rate / floor_rate
    print(f"full verification: {full_rate:10,.0f} events/s ({1e6 / full_rate:6.1f} us/event)")
    print(
        f"with auth rules (steps 1-5): {auth_rate:,.0f} events/s ({1e6 / auth_rate:6.1f} us/event)"
    )
    print(f"floor (verify+sha256): {floor_rate:6,.0f} events/s ({1e6 / floor_rate:6.1f} us/event)")
    verdict = "PASS" if ratio >= GOAL else "BELOW GOAL"
    print(f"ratio full/floor: {ratio:.2f} (goal >= {GOAL}): {verdict}")
    auth_ratio = auth_rate / floor_rate
    verdict = "PASS" if auth_ratio >= GOAL_WITH_AUTH else "BELOW GOAL"
    print(
        f"ratio with auth/floor (floor time / time with auth rules): {auth_ratio:.2f} "
        f"(goal >= {GOAL_WITH_AUTH}): {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

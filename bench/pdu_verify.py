"""Benchmark: full PDU verification against the cryptographic floor.

Run with ``.venv/bin/python bench/pdu_verify.py [--rounds N] [--versions 10,11,12]``.

* **full**: :func:`peekproxy.core.pdu.check_pdu` on every event of the Synapse fixture
  rooms (format and strict canonical-JSON checks, content hash, redaction, reference hash
  and event ID, ed25519 signature verification);
* **floor**: for the same events, only what no verifier can avoid: one pynacl
  ``VerifyKey.verify`` of the signature and one ``hashlib.sha256`` over the same
  pre-encoded bytes (everything encoded and decoded before timing).

Prints events/s for both and the ratio full/floor; the goal is a ratio of at least 0.6.
The fixtures are read from ``tests/fixtures/synapse-pdus``.
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

from peekproxy.core.events import redact, reference_hash_input
from peekproxy.core.pdu import check_pdu
from peekproxy.core.pdu_signatures import KeyLookup, VerifyKeyInfo, key_table
from peekproxy.core.room_versions import RoomVersion, room_version

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "synapse-pdus"
GOAL = 0.6

Case = tuple[dict[str, Any], RoomVersion, KeyLookup]


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

    cases = load(args.versions.split(","))
    verdicts = [check_pdu(pdu, rules, keys) for pdu, rules, keys in cases]
    outcomes = {o: sum(v.outcome == o for v in verdicts) for o in ("accept", "redact", "reject")}
    inputs = floor_inputs(cases)
    events = len(cases) * args.rounds
    print(f"{len(cases)} fixture PDUs (room versions {args.versions}) x {args.rounds} rounds")
    print(f"verdicts: {outcomes}")

    full = floor = float("inf")
    for _ in range(args.repeat):  # interleaved, so both see the same machine state
        full = min(full, time_full(cases, args.rounds))
        floor = min(floor, time_floor(inputs, args.rounds))
    full_rate, floor_rate = events / full, events / floor
    ratio = full_rate / floor_rate
    print(f"full verification: {full_rate:10,.0f} events/s ({1e6 / full_rate:6.1f} us/event)")
    print(f"floor (verify+sha256): {floor_rate:6,.0f} events/s ({1e6 / floor_rate:6.1f} us/event)")
    verdict = "PASS" if ratio >= GOAL else "BELOW GOAL"
    print(f"ratio full/floor: {ratio:.2f} (goal >= {GOAL}): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

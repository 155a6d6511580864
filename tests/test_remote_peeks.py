"""Remote peek subscriptions end to end (issue 5): peekproxy (a child process) peeks rooms
on the testbed over real TLS, every server found through a real DNS server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from tests.conftest import Spawn
from tests.peek_world import DOWN, NO_PEEK, PEEKPROXY, TESTBED, PeekWorld, build_world


@pytest.fixture
async def world(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> PeekWorld:
    return await build_world(
        nursery, tls_ca, tmp_path, spawn, peeks_env={"PEEKPROXY_PEEKS__LINGER": "0.2"}
    )


async def test_hint_order_and_fallback(world: PeekWorld) -> None:
    room_id = world.create_room("11")
    response = await world.peek(room_id, hints=[NO_PEEK, DOWN], servers=[TESTBED])
    assert response.status_code == 200, response.text
    assert response.json() == {"room_id": room_id}
    # nopeek.test was asked first (and said it does not know the endpoint), down.test
    # could not be reached, the testbed answered.
    assert [r["method"] for r in world.nopeek_requests] == ["PUT"]
    sub = world.subscription(room_id)
    assert sub["state"] == "active" and sub["server"] == TESTBED
    assert len(sub["peek_id"]) == 8 and sub["peek_id"].isalnum()
    assert world.log_of("start")[0][1:3] == (PEEKPROXY, room_id)
    # Live events arrive through /send and are stored once each, in order.
    first, second = world.send(room_id, "one"), world.send(room_id, "two")
    await world.wait_delivered(first, second)
    assert [b for k, b in world.stream(room_id) if k == "event"][-2:] == ["one", "two"]


async def test_all_candidates_unsupported_is_one_precise_error(world: PeekWorld) -> None:
    room_id = f"!missing:{NO_PEEK}"
    response = await world.peek(room_id, hints=[DOWN])
    assert response.status_code == 502
    body = response.json()
    assert body["errcode"] == "M_UNKNOWN"
    assert DOWN in body["error"] and NO_PEEK in body["error"]
    tried = body["error"].split(": ", 1)[1]  # after "could not peek <room>"
    assert tried.index(f"{DOWN}: ") < tried.index(f"; {NO_PEEK}: ")  # in the order tried
    assert "MSC2444" in body["error"]


async def test_forbidden_and_not_found_propagate(world: PeekWorld) -> None:
    for visibility in ("shared", "invited", "joined"):
        hidden = world.create_room("10", history_visibility=visibility)
        response = await world.peek(hidden, hints=[TESTBED])
        assert response.status_code == 403 and response.json()["errcode"] == "M_FORBIDDEN"
    unknown = await world.peek(f"!nope:{TESTBED}")
    assert unknown.status_code == 404 and unknown.json()["errcode"] == "M_NOT_FOUND"
    malformed = await world.peek("not-a-room")
    assert malformed.status_code == 400 and malformed.json()["errcode"] == "M_INVALID_PARAM"
    assert world.testbed.peeks.active(world.testbed.clock_ms()) == []


async def test_peek_by_alias(world: PeekWorld) -> None:
    room_id = world.create_room("12", alias="lobby")
    response = await world.peek(f"#lobby:{TESTBED}")
    assert response.status_code == 200, response.text
    assert response.json() == {"room_id": room_id}
    missing = await world.peek(f"#nothing:{TESTBED}")
    assert missing.status_code == 404 and missing.json()["errcode"] == "M_NOT_FOUND"


async def test_renewals_repeat_and_huge_intervals_are_clamped(world: PeekWorld) -> None:
    world.testbed.renewal_interval_ms = 2_000
    room_id = world.create_room("10")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    # Renewed at half the interval (1 s), again and again, with the same peek ID.
    await world.testbed.wait_until(lambda: len(world.log_of("renew")) >= 3, timeout=20)
    peek_ids = {entry[3] for entry in world.testbed.peek_log}
    assert len(peek_ids) == 1
    sub = world.subscription(room_id)
    assert sub["remote_interval_ms"] == 2_000
    assert sub["renew_at_ts"] - sub["last_renewed_ts"] == 1_000

    world.testbed.renewal_interval_ms = 3_600_000_000  # Dendrite's value
    other = world.create_room("10")
    assert (await world.peek(other, hints=[TESTBED])).status_code == 200
    clamped = world.subscription(other)
    assert clamped["remote_interval_ms"] == 3_600_000_000
    assert clamped["renew_at_ts"] - clamped["last_renewed_ts"] == 1_800_000  # 30 min max


async def test_lapse_is_repeeked_with_a_gap(world: PeekWorld) -> None:
    world.testbed.renewal_interval_ms = 2_000
    room_id = world.create_room("11")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    before = world.send(room_id, "before the lapse")
    await world.wait_delivered(before)
    # The testbed expires the peek; peekproxy is not told (there is no notification).
    [(_, origin, _, peek_id)] = world.log_of("start")
    assert world.testbed.peeks.delete(origin, room_id, peek_id, world.testbed.clock_ms())
    world.send(room_id, "missed while expired")
    world.send(room_id, "latest while expired")
    # The next renewal is answered as a new peek (full state), whose latest event peekproxy
    # lacks: a successful renewal is no lapse, so what lies between is fetched.
    await world.testbed.wait_until(lambda: len(world.log_of("start")) == 2)
    for _ in range(100):
        if world.stream(room_id)[-1] == ("event", "latest while expired"):
            break
        await trio.sleep(0.1)
    assert world.stream(room_id)[-3:] == [
        ("event", "before the lapse"),
        ("event", "missed while expired"),
        ("event", "latest while expired"),
    ]
    # A refused renewal is a lapse (Decision 4): the re-peek is a new peek, after a gap.
    world.testbed.faults.update(
        {"peek_count": 1, "peek_status": 404, "peek_errcode": "M_NOT_FOUND"}
    )
    [*_, (_, origin, _, peek_id)] = world.log_of("start")
    assert world.testbed.peeks.delete(origin, room_id, peek_id, world.testbed.clock_ms())
    world.send(room_id, "missed while lapsed")
    world.send(room_id, "latest while lapsed")
    await world.daemon.wait_for_log(rb"after a gap")
    stream = world.stream(room_id)
    # The new snapshot brings the events missed meanwhile from /backfill: they join what
    # is held, yet the gap stays for the sync (decision 4), closed for /messages.
    assert stream[-4:] == [
        ("event", "latest while expired"),
        ("gap", None),
        ("event", "missed while lapsed"),
        ("event", "latest while lapsed"),
    ]
    after = world.send(room_id, "after the lapse")
    await world.wait_delivered(after)
    assert world.stream(room_id)[-1] == ("event", "after the lapse")


async def test_exactly_one_delete_after_the_last_device_stops(world: PeekWorld) -> None:
    room_id = world.create_room("12")
    for device in ("D1", "D2"):
        response = await world.peek(room_id, device=device, hints=[TESTBED])
        assert response.status_code == 200, response.text
    assert len(world.log_of("start")) == 1  # one subscription shared by both devices
    assert (await world.unpeek(room_id, device="D1")).status_code == 200
    assert world.subscription(room_id)["wanted"] == 1
    assert (await world.unpeek(room_id, device="D2")).status_code == 200
    await world.daemon.wait_for_log(rb"stopped peek")  # after the 0.2 s linger
    assert len(world.log_of("delete")) == 1
    sub = world.subscription(room_id)
    assert (sub["state"], sub["pending_deletes_json"], sub["wanted"]) == ("dormant", "[]", 0)
    # Unpeek errors (decision 7).
    again = await world.unpeek(room_id, device="D2")
    assert again.status_code == 400 and again.json()["errcode"] == "M_BAD_STATE"
    never = await world.unpeek(f"!never:{TESTBED}")
    assert never.status_code == 404 and never.json()["errcode"] == "M_NOT_FOUND"


async def test_send_faults_are_handled(world: PeekWorld) -> None:
    room_id = world.create_room("10")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    faults = world.testbed.faults

    def count(event_id: str) -> int:
        return len(
            world.rows("SELECT 1 FROM room_stream WHERE event_id = ? AND kind = 'event'", event_id)
        )

    faults.update({"duplicate_next": 1})  # the same transaction twice (a replay)
    replayed = world.send(room_id, "replayed")
    await world.testbed.wait_until(
        lambda: (
            sum(replayed in t.event_ids for t in world.testbed.senders[PEEKPROXY].transactions) == 2
        )
    )
    faults.update({"resend_next": 1})  # the same events again in a new transaction
    resent = world.send(room_id, "resent")
    await world.testbed.wait_until(
        lambda: (
            sum(resent in t.event_ids for t in world.testbed.senders[PEEKPROXY].transactions) == 2
        )
    )
    assert count(replayed) == 1 and count(resent) == 1

    faults.update({"reorder_next": 1})  # second before first
    first, second = world.send(room_id, "first"), world.send(room_id, "second")
    await world.wait_delivered(first, second)
    faults.update({"withhold_next": 1})  # never pushed: the next event's prev is unknown
    withheld = world.send(room_id, "withheld")
    after = world.send(room_id, "after withheld")
    await world.wait_delivered(after)
    faults.update({"forge_next": 1})
    forged = world.send(room_id, "forged")
    await world.wait_delivered(forged)  # answered 200, with an error for that PDU
    assert count(forged) == 0  # the forged copy was rejected (bad signature)
    faults.update({"drop_next": 1})
    dropped = world.send(room_id, "dropped")
    await world.testbed.wait_until(
        lambda: any(t.status == "dropped" for t in world.testbed.senders[PEEKPROXY].transactions)
    )
    last = world.send(room_id, "last")
    await world.wait_delivered(last)
    bodies = [b for k, b in world.stream(room_id) if k == "event"]
    # Out-of-order, withheld and dropped events were fetched with get_missing_events, so
    # the stream keeps the room's order. The genuine copy of the forged event came that way
    # too, as an ancestor of the next one.
    assert bodies[-9:] == [
        "replayed",
        "resent",
        "first",
        "second",
        "withheld",
        "after withheld",
        "forged",
        "dropped",
        "last",
    ]
    assert count(withheld) == 1 and count(first) == 1 and count(dropped) == 1
    assert "gap" not in [k for k, _ in world.stream(room_id)]


async def test_forged_state_in_a_peek_response_is_deleted_and_the_next_server_tried(
    world: PeekWorld, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    room_id = world.create_room("10")
    forger = await world.add_server(nursery, tls_ca, tmp_path, "forger.test")

    async def forged_peek(scope: Any, body: bytes) -> tuple[int, Any]:
        forger.requests_seen.append(scope["method"])
        if scope["method"] == "DELETE":
            return 200, {}
        answer = json.loads(json.dumps(world.testbed.peek_response(world.testbed.rooms[room_id])))
        for pdu in answer["state"]:
            if pdu["type"] == "m.room.power_levels":
                pdu["content"]["users"]["@mallory:forger.test"] = 100  # signed field: forged
        return 200, answer

    forger.handler = forged_peek
    response = await world.peek(room_id, hints=["forger.test", TESTBED])
    assert response.status_code == 200, response.text
    assert world.subscription(room_id)["server"] == TESTBED
    await world.daemon.wait_for_log(rb"stopped peek \w+ of .* at forger\.test")
    assert forger.requests_seen == ["PUT", "DELETE"]


async def test_history_visibility_change_ends_peeks(world: PeekWorld) -> None:
    room_id = world.create_room("11")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    world.testbed.send(
        room_id,
        sender="admin",
        type="m.room.history_visibility",
        content={"history_visibility": "shared"},
        state_key="",
    )
    await world.daemon.wait_for_log(rb"no longer peekable")
    await world.daemon.wait_for_log(rb"stopped peek")
    assert world.subscription(room_id)["state"] == "ended"
    assert world.rows("SELECT state FROM device_peeks WHERE room_id = ?", room_id) == [("ended",)]
    assert len(world.log_of("delete")) == 1
    # Later events are not taken.
    late = world.send(room_id, "too late")
    assert not world.delivered(late)


async def test_restart_resumes_marks_a_gap_and_loses_nothing_acknowledged(
    world: PeekWorld, spawn: Spawn
) -> None:
    # Long enough that the restarts below (a second or more each on a loaded machine) never
    # outlast it: the peek must not lapse while peekproxy restarts.
    world.testbed.renewal_interval_ms = 20_000
    room_id = world.create_room("10")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    acknowledged = [world.send(room_id, f"acknowledged {i}") for i in range(5)]
    await world.wait_delivered(*acknowledged)
    await world.restart(spawn, kill=True)  # SIGKILL mid-peek
    # Everything peekproxy acknowledged was stored before it answered.
    stored = {e for (e,) in world.rows("SELECT event_id FROM events")}
    assert set(acknowledged) <= stored
    # It renews at once after the restart.
    renewals = len(world.log_of("renew"))
    await world.testbed.wait_until(lambda: len(world.log_of("renew")) > renewals)
    sub = world.subscription(room_id)
    assert sub["state"] == "active"

    # A lapse while down: the testbed expires the peek and refuses the renewal, events go
    # undelivered.
    await world.restart(spawn, kill=True)
    [(_, origin, _, peek_id)] = world.log_of("start")
    world.testbed.peeks.delete(origin, room_id, peek_id, world.testbed.clock_ms())
    world.testbed.faults.update(
        {"peek_count": 1, "peek_status": 404, "peek_errcode": "M_NOT_FOUND"}
    )
    world.send(room_id, "while down")
    # The renewal is refused: the new peek's state comes with a gap, and the first view's
    # history joins what is held ("acknowledged 4").
    await world.daemon.wait_for_log(rb"after a gap")
    assert world.stream(room_id)[-3:] == [
        ("event", "acknowledged 4"),
        ("gap", None),
        ("event", "while down"),
    ]


async def test_send_endpoint_rules(
    world: PeekWorld, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    """A third server pushes to peekproxy: verified, idempotent, bounded, per-PDU results."""
    import ipaddress
    import time

    from signedjson.key import generate_signing_key

    from peekproxy.federation.client import (
        FederationClient,
        RemoteError,
        build_ssl_context,
    )
    from peekproxy.federation.discovery import DnspythonLookup
    from peekproxy.federation.ip_policy import IpFilter
    from peekproxy.federation.signing_key import server_key_document

    key = generate_signing_key("o1")
    other = await world.add_server(nursery, tls_ca, tmp_path, "other.test")

    async def key_server(scope: Any, body: bytes) -> tuple[int, Any]:
        return 200, server_key_document(
            "other.test", key, now_ms=int(time.time() * 1000), valid_for_ms=3_600_000
        )

    other.handler = key_server
    ca_file = tmp_path / "other-ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    client = FederationClient(
        server_name="other.test",
        signing_key=key,
        dns=DnspythonLookup([world.dns]),
        ip_filter=IpFilter([], [ipaddress.ip_network("127.0.0.0/8")]),
        ssl_context=build_ssl_context(True, ca_file),
    )

    room_id = world.create_room("10")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    event_id = world.send(room_id, "relayed by a third server")
    genuine = world.testbed.rooms[room_id].event(event_id)
    assert genuine is not None
    unknown_room = dict(genuine, room_id="!elsewhere:testbed.test")
    txn = {
        "origin": "other.test",
        "origin_server_ts": 1,
        "pdus": [genuine, unknown_room],
        "edus": [
            {
                "edu_type": "m.typing",
                "content": {"room_id": room_id, "user_id": "@eve:other.test", "typing": True},
            },
            {  # a server speaks only for its own users: this one is ignored
                "edu_type": "m.receipt",
                "content": {
                    room_id: {
                        "m.read": {
                            "@admin:testbed.test": {"event_ids": [event_id], "data": {"ts": 1}}
                        }
                    }
                },
            },
            {"edu_type": "m.presence", "content": {"push": []}},
        ],
    }
    path = "/_matrix/federation/v1/send/txn1"
    first = await client.put_json(PEEKPROXY, path, txn)
    assert first["pdus"][event_id] == {}
    [(other_id, result)] = [(k, v) for k, v in first["pdus"].items() if k != event_id]
    assert "not peeking" in result["error"]
    assert await client.put_json(PEEKPROXY, path, txn) == first  # a replay: same answer
    assert len(world.rows("SELECT 1 FROM room_stream WHERE event_id = ?", event_id)) == 1
    assert world.rows("SELECT edu_type FROM ephemeral WHERE room_id = ?", room_id) == [
        ("m.typing",)
    ]
    assert world.rows("SELECT 1 FROM events WHERE event_id = ?", other_id) == []
    too_many = {"origin": "other.test", "origin_server_ts": 1, "pdus": [genuine] * 51}
    try:
        await client.put_json(PEEKPROXY, "/_matrix/federation/v1/send/txn2", too_many)
        raise AssertionError("expected 400")
    except RemoteError as e:
        assert e.status == 400 and "at most 50 PDUs" in (e.json or {}).get("error", "")
    await client.aclose()


async def test_failed_peeks_do_not_use_up_the_room_cap_and_429_propagates(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    world = await build_world(
        nursery, tls_ca, tmp_path, spawn, peeks_env={"PEEKPROXY_PEEKS__MAX_REMOTE_PEEKS": "2"}
    )
    for i in range(3):
        missing = await world.peek(f"!missing{i}:{TESTBED}")
        assert missing.status_code == 404
    room_id = world.create_room("10")
    world.testbed.faults.update({"peek_count": 2, "peek_status": 429, "peek_retry_after_ms": 50})
    limited = await world.peek(room_id, hints=[TESTBED])
    assert limited.status_code == 429, limited.text
    assert limited.json()["errcode"] == "M_LIMIT_EXCEEDED"
    assert limited.json()["retry_after_ms"] >= 50
    assert limited.headers["retry-after"]
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200

"""Issue 10 items 3 and 14: a full (Dendrite-style) renewal reply that runs ahead of the
``/send`` deliveries fills in what lies between instead of making a gap; late events never
land after their descendants; one room's ``get_missing_events`` holds up no other room."""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio
import trustme
from signedjson.key import generate_signing_key

from peekproxy.core.dag import dag_order
from peekproxy.federation.client import FederationClient, build_ssl_context
from peekproxy.federation.discovery import DnspythonLookup
from peekproxy.federation.ip_policy import IpFilter
from peekproxy.federation.signing_key import server_key_document
from peekproxy.store import ReadTransaction, Storage, WriteTransaction
from tests.conftest import OpenStore, Spawn
from tests.peek_world import PEEKPROXY, SECRET, TESTBED, PeekWorld, build_world


def _pdu(event_id: str, depth: int, prevs: list[str], body: str) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "room_id": "!r:x",
        "type": "m.room.message",
        "sender": "@a:x",
        "depth": depth,
        "prev_events": prevs,
        "content": {"body": body},
    }


async def _bodies(store: Storage) -> list[str | None]:
    def read(tx: ReadTransaction) -> list[str | None]:
        out: list[str | None] = []
        for _, kind, event_id in tx.stream_events("!r:x"):
            pdu = tx.event_pdu(event_id) if event_id else None
            out.append(pdu["content"]["body"] if pdu else kind)
        return out

    result: list[str | None] = await store.read(read)
    return result


async def test_dag_order_puts_each_event_after_its_prev_events(open_store: OpenStore) -> None:
    e1, e2, e3 = _pdu("$1", 1, [], "1"), _pdu("$2", 2, ["$1"], "2"), _pdu("$3", 3, ["$2"], "3")
    fork = _pdu("$f", 2, ["$1"], "f")
    given = [("$3", e3, False), ("$f", fork, False), ("$2", e2, False), ("$1", e1, False)]
    assert [e for e, _, _ in dag_order(given)] == ["$1", "$f", "$2", "$3"]

    store = await open_store("a.example")
    try:
        appended, gap = await store.write(
            lambda tx: tx.append_in_dag_order("!r:x", given, now_ms=1)
        )
        assert appended == ["$1", "$f", "$2", "$3"] and not gap
        assert await _bodies(store) == ["1", "f", "2", "3"]
    finally:
        await store.aclose()


async def test_late_events_behind_a_gap_are_stored_but_not_appended(
    open_store: OpenStore,
) -> None:
    store = await open_store("a.example")
    pdus = {i: _pdu(f"${i}", i, [f"${i - 1}"] if i > 1 else [], str(i)) for i in range(1, 7)}

    def append(tx: WriteTransaction, *numbers: int) -> list[int | None]:
        return [
            tx.append_event("!r:x", f"${i}", pdus[i], redacted=False, now_ms=1) for i in numbers
        ]

    try:
        await store.write(lambda tx: append(tx, 1, 2))
        # $5 arrives; $3 and $4 could not be fetched: a gap before it.
        await store.write(lambda tx: (tx.add_gap("!r:x", 1), append(tx, 5)))
        # Then the delayed deliveries of $3 and $4 (and $5 again), and a new $6.
        late = await store.write(lambda tx: append(tx, 3, 4, 5, 6))
        assert late[:3] == [None, None, None] and late[3] is not None
        assert await _bodies(store) == ["1", "2", "gap", "5", "6"]
        stored = await store.read(lambda tx: tx.known_event_ids(["$3", "$4"]))
        assert stored == {"$3", "$4"}  # kept (never fetched again), but behind the gap
        # The same through append_in_dag_order: the gap is marked where parents are unknown.
        y5, y6 = _pdu("$y5", 5, ["$y4"], "y5"), _pdu("$y6", 6, ["$y5"], "y6")
        items = [("$y6", y6, False), ("$y5", y5, False)]
        appended, gap = await store.write(
            lambda tx: tx.append_in_dag_order("!r:y", items, now_ms=1)
        )
        assert appended == ["$y5", "$y6"] and gap
        # A late event whose parents are unknown (a renewal reply's latest event, older
        # than what /send already brought behind a gap) adds no gap after its descendants.
        y3 = _pdu("$y3", 3, ["$y2"], "y3")
        appended, gap = await store.write(
            lambda tx: tx.append_in_dag_order("!r:y", [("$y3", y3, False)], now_ms=1)
        )
        assert appended == [] and not gap
        assert [kind for _, kind, _ in await store.read(lambda tx: tx.stream_events("!r:y"))] == [
            "gap",
            "event",
            "event",
        ]
    finally:
        await store.aclose()


async def _sync_room(world: PeekWorld, since: str, room_id: str) -> tuple[dict[str, Any], str]:
    answer = await world.sync(since=since, timeout_ms=0)
    return answer["rooms"]["peek"].get(room_id, {}), answer["next_batch"]


async def test_full_renewal_reply_ahead_of_delivery_makes_no_gap(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    world = await build_world(nursery, tls_ca, tmp_path, spawn)
    world.testbed.faults.update({"renew_full": 1})  # renewals answered as Dendrite does
    world.testbed.renewal_interval_ms = 2_000  # renewed every second
    room_id = world.create_room("10")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    token = (await world.sync())["next_batch"]
    world.testbed.faults.update({"delay_ms": 4_000})  # deliveries lag behind renewals
    renewals = len(world.log_of("renew"))
    sent = [world.send(room_id, f"m{i}") for i in range(3)]
    # A renewal is answered with state at m2 while m0..m2 are still on their way.
    await world.testbed.wait_until(lambda: len(world.log_of("renew")) > renewals + 1)
    assert not world.delivered(sent[-1])
    await world.wait_delivered(*sent)
    world.testbed.faults.update({"delay_ms": 0})
    after = world.send(room_id, "after")
    await world.wait_delivered(after)
    assert world.stream(room_id)[-4:] == [
        ("event", "m0"),
        ("event", "m1"),
        ("event", "m2"),
        ("event", "after"),
    ]
    assert "gap" not in [kind for kind, _ in world.stream(room_id)]
    room, _ = await _sync_room(world, token, room_id)
    assert [e["content"].get("body") for e in room["timeline"]["events"]] == [
        "m0",
        "m1",
        "m2",
        "after",
    ]
    assert room["timeline"]["limited"] is False


async def test_missing_events_of_one_room_hold_up_no_other_room(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    """A third server relays events of two rooms; its get_missing_events hangs for room A.
    Room B's events, in the same transaction and in the next one, are stored and answered
    meanwhile."""
    world = await build_world(nursery, tls_ca, tmp_path, spawn)
    room_a, room_b = world.create_room("10"), world.create_room("11")
    for room_id in (room_a, room_b):
        assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    world.testbed.faults.update({"withhold_next": 4})  # peekproxy gets these only from other
    world.send(room_a, "a1")
    a2 = world.send(room_a, "a2")
    b1, b2 = world.send(room_b, "b1"), world.send(room_b, "b2")

    key = generate_signing_key("o1")
    other = await world.add_server(nursery, tls_ca, tmp_path, "other.test")
    release = trio.Event()
    asked: list[str] = []

    async def handler(scope: Any, body: bytes) -> tuple[int, Any]:
        if scope["path"] == "/_matrix/key/v2/server":
            return 200, server_key_document(
                "other.test", key, now_ms=int(time.time() * 1000), valid_for_ms=3_600_000
            )
        if "/get_missing_events/" in scope["path"]:
            request = json.loads(body)
            room = world.testbed.rooms[room_a if room_a in scope["path"] else room_b]
            asked.append(room.room_id)
            if room.room_id == room_a:
                await release.wait()  # the slow room
            events = room.missing_events(
                request["earliest_events"], request["latest_events"], request["limit"], 0
            )
            return 200, {"events": events}
        return 404, {"errcode": "M_UNRECOGNIZED", "error": "no"}

    other.handler = handler
    ca_file = tmp_path / "other-ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    client = FederationClient(
        server_name="other.test",
        signing_key=key,
        dns=DnspythonLookup([world.dns]),
        ip_filter=IpFilter([], [ipaddress.ip_network("127.0.0.0/8")]),
        ssl_context=build_ssl_context(True, ca_file),
    )

    def pdu(room_id: str, event_id: str) -> dict[str, Any]:
        found = world.testbed.rooms[room_id].event(event_id)
        assert found is not None
        return found

    def txn(*pdus: dict[str, Any]) -> dict[str, Any]:
        return {"origin": "other.test", "origin_server_ts": 1, "pdus": list(pdus)}

    answers: dict[str, Any] = {}
    t1_answered = trio.Event()

    async def put(txn_id: str, body: dict[str, Any]) -> None:
        answers[txn_id] = await client.put_json(
            PEEKPROXY, f"/_matrix/federation/v1/send/{txn_id}", body
        )
        if txn_id == "t1":
            t1_answered.set()

    def streamed(event_id: str) -> bool:
        return bool(world.rows("SELECT 1 FROM room_stream WHERE event_id = ?", event_id))

    # One transaction: a2 (whose parent a1 must be fetched: that hangs) and b1.
    nursery.start_soon(put, "t1", txn(pdu(room_a, a2), pdu(room_b, b1)))
    with trio.fail_after(5):
        for _ in range(100):  # room B of the same transaction is stored meanwhile
            if streamed(b1):
                break
            await trio.sleep(0.05)
        await put("t2", txn(pdu(room_b, b2)))  # and another transaction is answered
    assert answers["t2"] == {"pdus": {b2: {}}}
    assert streamed(b1) and streamed(b2) and "t1" not in answers and asked == [room_a]
    release.set()
    with trio.fail_after(10):
        await t1_answered.wait()
    assert answers["t1"] == {"pdus": {a2: {}, b1: {}}}
    assert world.stream(room_a)[-2:] == [("event", "a1"), ("event", "a2")]
    assert world.stream(room_b)[-2:] == [("event", "b1"), ("event", "b2")]
    await client.aclose()


@pytest.mark.slow
async def test_200_messages_arrive_once_in_order_through_lagging_deliveries_and_a_kill(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    """Issue 10 acceptance: the testbed answers renewals with full state and delays /send;
    200 messages sent in bursts, peekproxy killed (-9) and restarted on the same data in
    the middle; one device syncing all along sees each message once, in order, and never
    ``limited: true``."""
    world = await build_world(
        nursery, tls_ca, tmp_path, spawn, testbed_peeks={"renew_reply": "full"}
    )
    world.testbed.renewal_interval_ms = 6_000  # renewed every 3 s; a restart is no lapse
    room_id = world.create_room("10")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    token = (await world.sync())["next_batch"]
    world.testbed.faults.update({"delay_ms": 1_500})  # each transaction waits 1.5 s
    seen: list[str] = []
    limited: list[bool] = []
    failed_syncs = 0
    done, all_seen = trio.Event(), trio.Event()

    async def keep_syncing() -> None:
        nonlocal token, failed_syncs
        params = {"timeline": {"limit": 1000}}
        while not done.is_set():
            try:
                async with httpx.AsyncClient(timeout=30) as http:
                    response = await http.get(
                        f"{world.daemon.client}/_peekproxy/v1/sync",
                        params={
                            "user_id": "@alice:peekproxy.test",
                            "device_id": "D1",
                            "timeout": "1000",
                            "since": token,
                            "filter": json.dumps({"room": params}),
                        },
                        headers={"Authorization": f"Bearer {SECRET}"},
                    )
            except httpx.TransportError:
                failed_syncs += 1  # peekproxy is down: retry
                await trio.sleep(0.2)
                continue
            assert response.status_code == 200, response.text
            body = response.json()
            token = body["next_batch"]
            room = body["rooms"]["peek"].get(room_id)
            if room is not None:
                limited.append(room["timeline"]["limited"])
                seen.extend(e["content"]["body"] for e in room["timeline"]["events"])
                if len(seen) >= 200:
                    all_seen.set()

    sent = [f"message {i}" for i in range(200)]
    async with trio.open_nursery() as syncing:
        syncing.start_soon(keep_syncing)
        renewals = len(world.log_of("renew"))
        for burst in range(20):
            for body in sent[burst * 10 : burst * 10 + 10]:
                world.send(room_id, body)
            if burst == 9:
                await world.restart(spawn, kill=True)  # deliveries and renewals in flight
            await trio.sleep(0.4)
        world.testbed.faults.update({"delay_ms": 0})
        with trio.fail_after(40):
            await all_seen.wait()
        await trio.sleep(1)  # a duplicate would show up by now
        done.set()
    assert seen == sent  # each once, in the order sent
    # /messages pages back through the same order.
    history: list[str] = []
    since: str | None = token
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(10):
            response = await http.get(
                f"{world.daemon.client}/_peekproxy/v1/rooms/{quote(room_id, safe='')}/messages",
                params={
                    "user_id": "@alice:peekproxy.test",
                    "device_id": "D1",
                    "dir": "b",
                    "from": since,
                    "limit": "100",
                },
                headers={"Authorization": f"Bearer {SECRET}"},
            )
            assert response.status_code == 200, response.text
            page = response.json()
            history += [
                e["content"]["body"] for e in page["chunk"] if e["type"] == "m.room.message"
            ]
            since = page.get("end")
            if len(history) >= len(sent) or since is None:
                break
    assert history[: len(sent)] == sent[::-1]
    assert limited and not any(limited)
    assert failed_syncs > 0  # the device did sync across the restart
    assert len(world.log_of("renew")) - renewals >= 3  # full renewal replies raced deliveries
    assert "gap" not in [kind for kind, _ in world.stream(room_id)]
    assert b"recorded a gap" not in world.daemon.stderr
    assert b"is ahead of us: fetched" in world.daemon.stderr  # a reply did run ahead


async def test_events_pushed_while_a_peek_is_set_up_are_kept(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    """The target pushes a room's events as soon as it has answered the peek's PUT; one
    that arrives while peekproxy still fetches the first view waits for the set-up instead
    of being refused (the target would not send it again)."""
    world = await build_world(nursery, tls_ca, tmp_path, spawn)
    room_id = world.create_room("10")
    world.send(room_id, "before the peek")
    world.testbed.faults.update({"backfill_delay_ms": 1_500})  # a slow first view
    answers: list[httpx.Response] = []

    async def peek() -> None:
        answers.append(await world.peek(room_id, hints=[TESTBED]))

    async with trio.open_nursery() as peeking:
        peeking.start_soon(peek)
        await world.testbed.wait_until(lambda: len(world.log_of("start")) == 1)
        during = world.send(room_id, "during the set-up")
        await world.wait_delivered(during)  # answered once the set-up is stored
    assert [a.status_code for a in answers] == [200]
    timeline = (await world.sync())["rooms"]["peek"][room_id]["timeline"]
    assert [e["content"].get("body") for e in timeline["events"]][-2:] == [
        "before the peek",
        "during the set-up",
    ]


async def test_a_send_is_completed_while_its_origin_is_backed_off(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    """A failed request to the target backs it off (a 5xx here); its next /send proves it
    is up, so the events that /send lacks are still fetched: no false gap."""
    world = await build_world(
        nursery,
        tls_ca,
        tmp_path,
        spawn,
        peeks_env={"PEEKPROXY_FEDERATION__BACKOFF_INITIAL": "60s"},
    )
    world.testbed.renewal_interval_ms = 2_000  # renewed after a second
    room_id = world.create_room("10")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    world.testbed.faults.update({"peek_count": 1, "peek_status": 500})
    await world.daemon.wait_for_log(rb"renewal of .* failed")  # backed off for a minute
    world.testbed.faults.update({"withhold_next": 1})
    world.send(room_id, "withheld")
    await world.wait_delivered(world.send(room_id, "after"))
    assert world.stream(room_id)[-2:] == [("event", "withheld"), ("event", "after")]

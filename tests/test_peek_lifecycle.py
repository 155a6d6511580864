"""The life of a device peek against real peers (issue 10, items 2, 4 and 5), end to end:
peekproxy is a child process, the testbed the remote room host, all over TLS and real DNS.

* peeking a room the device already peeks changes nothing it sees (acceptance scenario 9);
* a target that fails renewals and re-peeks with 5xx is asked with back-off, per room and
  per destination (docs/peeking.md, "Back-off");
* unpeeking a dormant peek (idle drop, decision 9) ends it: ``200 {}``, ``rooms.leave``,
  never restored (decision 7).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from tests.conftest import Spawn
from tests.peek_world import TESTBED, PeekWorld, build_world

pytestmark = pytest.mark.slow


def bodies(room: dict[str, Any]) -> list[str | None]:
    return [e["content"].get("body") for e in room["timeline"]["events"]]


def shown_types(room: dict[str, Any]) -> set[str]:
    return {e["type"] for e in [*room["state"]["events"], *room["timeline"]["events"]]}


@pytest.fixture
async def world(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> PeekWorld:
    return await build_world(
        nursery, tls_ca, tmp_path, spawn, peeks_env={"PEEKPROXY_PEEKS__LINGER": "0.2"}
    )


async def test_peeking_again_changes_nothing_the_device_sees(world: PeekWorld) -> None:
    room_id = world.create_room("11", topic="lobby")
    world.send(room_id, "old news")
    token = (await world.sync())["next_batch"]
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    first = await world.sync(since=token)
    assert bodies(first["rooms"]["peek"][room_id])[-1] == "old news"  # after the room's set-up
    quiet = await world.sync(since=first["next_batch"])
    assert room_id not in quiet["rooms"]["peek"]

    # Peek again while a long-poll waits, and once more after it: both 200, same room ID.
    polled: dict[str, Any] = {}

    async def poll() -> None:
        polled.update(await world.sync(since=quiet["next_batch"], timeout_ms=1_500))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        again = await world.peek(room_id, hints=[TESTBED])
    assert again.status_code == 200 and again.json() == {"room_id": room_id}
    # The long-poll was not answered with the room: full state and old events again.
    assert polled["rooms"]["peek"] == {} and polled["rooms"]["leave"] == {}
    third = await world.peek(f"{room_id}", servers=[TESTBED])
    assert third.status_code == 200 and third.json() == {"room_id": room_id}
    after = await world.sync(since=polled["next_batch"], timeout_ms=300)
    assert after["rooms"]["peek"] == {} and after["rooms"]["leave"] == {}
    assert len(world.log_of("start")) == 1  # one federation subscription throughout

    # Later events arrive once, unlimited, as for any peek.
    event_id = world.send(room_id, "new news")
    await world.wait_delivered(event_id)
    live = await world.sync(since=after["next_batch"])
    room = live["rooms"]["peek"][room_id]
    assert bodies(room) == ["new news"]
    assert room["timeline"]["limited"] is False and room["state"]["events"] == []
    assert room_id not in (await world.sync(since=live["next_batch"]))["rooms"]["peek"]


@pytest.fixture
async def idle_world(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> PeekWorld:
    return await build_world(
        nursery,
        tls_ca,
        tmp_path,
        spawn,
        peeks_env={"PEEKPROXY_PEEKS__LINGER": "0.1", "PEEKPROXY_PEEKS__IDLE_TIMEOUT": "1s"},
    )


async def test_unpeek_ends_a_dormant_peek(idle_world: PeekWorld) -> None:
    world = idle_world
    room_id = world.create_room("10")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    synced = await world.sync()
    assert room_id in synced["rooms"]["peek"]
    # The device stops syncing: its peek goes dormant and the remote peek is DELETEd.
    await world.daemon.wait_for_log(rb"is dormant")
    await world.daemon.wait_for_log(rb"stopped peek")
    assert world.rows("SELECT state FROM device_peeks WHERE room_id = ?", room_id) == [("dormant",)]

    unpeeked = await world.unpeek(room_id)
    assert unpeeked.status_code == 200, unpeeked.text
    assert unpeeked.json() == {}
    # Decision 7: the room is in rooms.leave (nothing happened since the last sync: {}),
    # and the dormant peek is not restored: no new remote peek.
    after = await world.sync(since=synced["next_batch"])
    assert room_id not in after["rooms"]["peek"]
    assert after["rooms"]["leave"] == {room_id: {}}
    quiet = await world.sync(since=after["next_batch"], timeout_ms=300)
    assert quiet["rooms"]["peek"] == {} and quiet["rooms"]["leave"] == {}
    assert len(world.log_of("start")) == 1
    sub = world.subscription(room_id)
    assert (sub["state"], sub["wanted"], sub["pending_deletes_json"]) == ("dormant", 0, "[]")
    assert world.rows("SELECT state FROM device_peeks WHERE room_id = ?", room_id) == [("ended",)]
    # Ended now: a second unpeek is refused (decision 7) ...
    twice = await world.unpeek(room_id)
    assert twice.status_code == 400 and twice.json()["errcode"] == "M_BAD_STATE"
    # ... and a new peek starts afresh, with the full state (scenario 12).
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    back = await world.sync(since=quiet["next_batch"])
    assert "m.room.create" in shown_types(back["rooms"]["peek"][room_id])
    assert len(world.log_of("start")) == 2


async def test_peeking_a_dormant_peek_again_restores_it_with_a_gap(idle_world: PeekWorld) -> None:
    world = idle_world
    room_id = world.create_room("12", topic="before")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    token = (await world.sync(limit=3))["next_batch"]
    await world.daemon.wait_for_log(rb"is dormant")
    await world.daemon.wait_for_log(rb"stopped peek")
    for i in range(5):
        world.send(room_id, f"while idle {i}")
    world.testbed.send(
        room_id, sender="admin", type="m.room.topic", content={"topic": "after"}, state_key=""
    )
    # Peeking again (rather than syncing) restores the dormant peek as decision 9 says.
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    restored = await world.sync(since=token, limit=3)
    room = restored["rooms"]["peek"][room_id]
    assert room["timeline"]["limited"] is True and room["timeline"]["prev_batch"]
    topics = [
        e["content"]["topic"]
        for e in [*room["state"]["events"], *room["timeline"]["events"]]
        if e["type"] == "m.room.topic"
    ]
    assert topics == ["after"]
    assert len(world.log_of("start")) == 2


async def _failing_world(
    nursery: trio.Nursery,
    tls_ca: trustme.CA,
    tmp_path: Path,
    spawn: Spawn,
    *,
    rooms: int,
    destination_backoff_s: float,
) -> tuple[PeekWorld, list[str], list[tuple[float, str]]]:
    """``rooms`` rooms peeked through the hints other.test (which answers every PUT with
    500) and the testbed, renewed every second; the per-destination back-off starts at
    ``destination_backoff_s`` (and stays there when it is tiny). Returns the world, the
    rooms and other.test's PUTs (trio time, path)."""
    tiny = destination_backoff_s < 0.1
    world = await build_world(
        nursery,
        tls_ca,
        tmp_path,
        spawn,
        peeks_env={
            "PEEKPROXY_PEEKS__LINGER": "0.2",
            "PEEKPROXY_FEDERATION__BACKOFF_INITIAL": str(destination_backoff_s),
            "PEEKPROXY_FEDERATION__BACKOFF_MAX": str(destination_backoff_s if tiny else 60),
        },
    )
    world.testbed.renewal_interval_ms = 2_000  # renewed every second
    other = await world.add_server(nursery, tls_ca, tmp_path, "other.test")
    other_puts: list[tuple[float, str]] = []

    async def broken(scope: Any, body: bytes) -> tuple[int, Any]:
        if scope["method"] == "PUT":
            other_puts.append((trio.current_time(), scope["path"]))
        return 500, {"errcode": "M_UNKNOWN", "error": "internal server error"}

    other.handler = broken
    room_ids = [world.create_room("10") for _ in range(rooms)]
    for room_id in room_ids:
        peeked = await world.peek(room_id, hints=["other.test", TESTBED])
        assert peeked.status_code == 200, peeked.text
    assert len(world.log_of("start")) == rooms
    return world, room_ids, other_puts


async def _fail_for_ten_seconds(
    world: PeekWorld, rooms: list[str], other_puts: list[tuple[float, str]]
) -> tuple[dict[str, int], dict[str, int]]:
    """The testbed answers every peek PUT (renewals included) with 500 for 10 s: the PUTs
    each room got at the testbed and at other.test meanwhile. Then the testbed recovers, and
    every room must be peeked again (the back-off never gives up)."""
    from urllib.parse import unquote

    world.testbed.faults.update({"peek_count": 10**9, "peek_status": 500})
    started, start_ms = trio.current_time(), world.testbed.clock_ms()
    await trio.sleep(10)  # the measurement window itself: real time is the point here
    window = [
        r
        for r in world.testbed.peek_requests
        if r.method == "PUT" and start_ms <= r.at_ms <= start_ms + 10_000
    ]
    assert all(r.status == 500 for r in window)
    testbed = {room_id: sum(r.room_id == room_id for r in window) for room_id in rooms}
    other = {
        room_id: sum(
            started <= at <= started + 10 and unquote(path).split("/")[5] == room_id
            for at, path in other_puts
        )
        for room_id in rooms
    }
    print(f"PUTs in 10 s: testbed {sorted(testbed.values())}, other.test {sorted(other.values())}")
    world.testbed.faults.update({"peek_count": 0})
    with trio.fail_after(90):  # the room back-off stays under 72 s
        for room_id in rooms:  # logged once stored: a new peek, after a gap (decision 4)
            await world.daemon.wait_for_log(
                rb"peeking " + re.escape(room_id.encode()) + rb" through testbed\.test .*gap"
            )
            assert world.subscription(room_id)["state"] == "active"
    return testbed, other


async def test_a_failing_target_is_asked_with_back_off_per_room(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    """The room's own back-off alone (the per-destination one made negligible)."""
    world, rooms, other_puts = await _failing_world(
        nursery, tls_ca, tmp_path, spawn, rooms=1, destination_backoff_s=0.01
    )
    testbed, other = await _fail_for_ten_seconds(world, rooms, other_puts)
    # docs/peeking.md: the renewal due within the first second fails (1), is retried after
    # ≥ 0.8 s (2), and once more when the 2 s interval runs out (3); the room has lapsed and
    # is re-peeked at once (4, other.test 1); the failures in a row then wait ≥ 0.8·8 s
    # (5, other.test 2) and ≥ 0.8·16 s (past the window). The old code: hundreds a second.
    assert all(n <= 5 for n in testbed.values()), testbed
    assert all(n <= 2 for n in other.values()), other


async def test_a_failing_target_is_asked_with_back_off_per_destination(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    """Four rooms at one failing destination: its 5xx answers back the destination off
    (1 s doubling, ±20 %), so the rooms together ask it about as often as one would."""
    world, rooms, other_puts = await _failing_world(
        nursery, tls_ca, tmp_path, spawn, rooms=4, destination_backoff_s=1
    )
    testbed, other = await _fail_for_ten_seconds(world, rooms, other_puts)
    # After a 5xx the destination is not asked for ≥ 0.8 s, then ≥ 1.6 s, ≥ 3.2 s, ≥ 6.4 s:
    # at most 4 moments in 10 s, each letting through the requests that start together
    # (rooms whose retries fall within one round trip; rarely more than one). The rooms'
    # own back-off alone would allow 4 × 5.
    assert sum(testbed.values()) <= 8, testbed
    assert sum(other.values()) <= 8, other

"""The life of a device peek against real peers (issue 10, items 2, 4 and 5), end to end:
peekproxy is a child process, the testbed the remote room host, all over TLS and real DNS.

* peeking a room the device already peeks changes nothing it sees (acceptance scenario 9);
* a target that fails renewals and re-peeks with 5xx is asked with back-off, per room and
  per destination (docs/peeking.md, "Back-off");
* unpeeking a dormant peek (idle drop, decision 9) ends it: ``200 {}``, ``rooms.leave``,
  never restored (decision 7).
"""

from __future__ import annotations

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
    assert bodies(first["rooms"]["peek"][room_id]) == ["old news"]
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

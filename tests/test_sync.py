"""Peeking via /sync (MSC2753) end to end, through the delegation API's /sync: the
protocol.md §6 client scenarios against the testbed as the remote room host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from tests.conftest import Spawn
from tests.peek_world import TESTBED, PeekWorld, build_world


@pytest.fixture
async def world(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> PeekWorld:
    return await build_world(
        nursery, tls_ca, tmp_path, spawn, peeks_env={"PEEKPROXY_PEEKS__LINGER": "0.2"}
    )


def bodies(room: dict[str, Any]) -> list[str | None]:
    return [e["content"].get("body") for e in room["timeline"]["events"]]


async def test_peek_sync_live_and_no_change(world: PeekWorld) -> None:
    room_id = world.create_room("10", name="Peekable", topic="Topic")
    world.send(room_id, "something to peek")
    initial = await world.sync()
    assert initial["rooms"]["peek"] == {} and initial["rooms"]["leave"] == {}
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    first = await world.sync(since=initial["next_batch"])
    room = first["rooms"]["peek"][room_id]
    assert set(room) >= {"timeline", "state", "ephemeral"}
    assert {"events", "limited", "prev_batch"} <= set(room["timeline"])
    # Current state is covered by state ∪ timeline, m.room.create included.
    seen = {
        (e["type"], e.get("state_key"))
        for e in [*room["state"]["events"], *room["timeline"]["events"]]
        if "state_key" in e
    }
    assert {
        ("m.room.create", ""),
        ("m.room.name", ""),
        ("m.room.topic", ""),
        ("m.room.history_visibility", ""),
    } <= seen
    assert room["timeline"]["events"][-1]["content"]["body"] == "something to peek"
    assert all("room_id" not in e for e in room["timeline"]["events"])
    assert "join" not in first["rooms"] or first["rooms"]["join"] == {}

    # No change: the room is left out.
    quiet = await world.sync(since=first["next_batch"])
    assert room_id not in quiet["rooms"]["peek"]

    # Live: only the new event.
    event_id = world.send(room_id, "something else to peek")
    await world.wait_delivered(event_id)
    live = await world.sync(since=quiet["next_batch"])
    live_room = live["rooms"]["peek"][room_id]
    assert bodies(live_room) == ["something else to peek"]
    assert live_room["timeline"]["limited"] is False
    assert live_room["timeline"]["events"][0]["event_id"] == event_id
    assert live_room["timeline"]["events"][0]["unsigned"]["age"] >= 0


async def test_long_poll_returns_when_an_event_arrives(world: PeekWorld) -> None:
    room_id = world.create_room("11")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    token = (await world.sync())["next_batch"]
    result: dict[str, Any] = {}
    answered = trio.Event()

    async def poll() -> None:
        result.update(await world.sync(since=token, timeout_ms=30_000))
        answered.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        start = trio.current_time()
        world.send(room_id, "wake up")
        with trio.fail_after(10):
            await answered.wait()
        assert trio.current_time() - start < 10
    assert bodies(result["rooms"]["peek"][room_id]) == ["wake up"]
    empty = await world.sync(since=result["next_batch"], timeout_ms=200)
    assert empty["rooms"]["peek"] == {}  # timed out: an empty answer


async def test_per_device_isolation(world: PeekWorld) -> None:
    room_id = world.create_room("12")
    assert (await world.peek(room_id, device="B1", hints=[TESTBED])).status_code == 200
    b2 = await world.sync(device="B2")
    event_id = world.send(room_id, "only for B1")
    await world.wait_delivered(event_id)
    b2_again = await world.sync(device="B2", since=b2["next_batch"])
    assert room_id not in b2["rooms"]["peek"] and room_id not in b2_again["rooms"]["peek"]
    b1 = await world.sync(device="B1")
    assert bodies(b1["rooms"]["peek"][room_id])[-1] == "only for B1"


async def test_unpeek_leave_and_peek_again(world: PeekWorld) -> None:
    room_id = world.create_room("10")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    token = (await world.sync())["next_batch"]
    last = world.send(room_id, "before unpeek")
    await world.wait_delivered(last)
    assert (await world.unpeek(room_id)).status_code == 200
    after = await world.sync(since=token)
    assert room_id not in after["rooms"]["peek"]
    assert bodies(after["rooms"]["leave"][room_id]) == ["before unpeek"]
    await world.daemon.wait_for_log(rb"stopped peek")  # DELETE after the linger
    quiet = await world.sync(since=after["next_batch"])
    assert room_id not in quiet["rooms"]["leave"]
    # An unpeek with nothing new since the last sync leaves with {}.
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    again = await world.sync(since=quiet["next_batch"])
    room = again["rooms"]["peek"][room_id]
    types = {e["type"] for e in [*room["state"]["events"], *room["timeline"]["events"]]}
    assert "m.room.create" in types  # full state again
    assert (await world.unpeek(room_id)).status_code == 200
    left = await world.sync(since=again["next_batch"])
    assert left["rooms"]["leave"][room_id] == {}


async def test_history_visibility_change_moves_the_room_to_leave(world: PeekWorld) -> None:
    room_id = world.create_room("11")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    token = (await world.sync())["next_batch"]
    world.testbed.send(
        room_id,
        sender="admin",
        type="m.room.history_visibility",
        content={"history_visibility": "shared"},
        state_key="",
    )
    await world.daemon.wait_for_log(rb"no longer peekable")
    after = await world.sync(since=token)
    assert room_id not in after["rooms"]["peek"]
    left = after["rooms"]["leave"][room_id]
    assert left["timeline"]["events"][-1]["type"] == "m.room.history_visibility"


async def test_full_state_and_bad_tokens(world: PeekWorld) -> None:
    room_id = world.create_room("10")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    token = (await world.sync())["next_batch"]
    full = await world.sync(since=token, full_state=True)
    room = full["rooms"]["peek"][room_id]
    types = {e["type"] for e in [*room["state"]["events"], *room["timeline"]["events"]]}
    assert {"m.room.create", "m.room.power_levels", "m.room.join_rules"} <= types
    import httpx

    from tests.peek_world import SECRET

    async with httpx.AsyncClient() as http:
        bad = await http.get(
            f"{world.daemon.client}/_peekproxy/v1/sync",
            params={"user_id": "@a:b.test", "device_id": "D", "since": "junk"},
            headers={"Authorization": f"Bearer {SECRET}"},
        )
    assert bad.status_code == 400 and bad.json()["errcode"] == "M_INVALID_PARAM"


async def test_more_events_than_the_limit_are_limited(world: PeekWorld) -> None:
    room_id = world.create_room("12")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    token = (await world.sync())["next_batch"]
    sent = [world.send(room_id, f"m{i}") for i in range(8)]
    await world.wait_delivered(*sent)
    result = await world.sync(since=token, limit=3)
    room = result["rooms"]["peek"][room_id]
    assert bodies(room) == ["m5", "m6", "m7"]
    assert room["timeline"]["limited"] is True
    assert room["timeline"]["prev_batch"]


async def test_restart_keeps_tokens_valid(world: PeekWorld, spawn: Spawn) -> None:
    room_id = world.create_room("10")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    first = world.send(room_id, "before restart")
    await world.wait_delivered(first)
    token = (await world.sync())["next_batch"]
    await world.restart(spawn, kill=False)
    second = world.send(room_id, "after restart")
    await world.wait_delivered(second)
    after = await world.sync(since=token)
    assert bodies(after["rooms"]["peek"][room_id]) == ["after restart"]  # once each


async def test_idle_drop_and_gappy_restore(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    world = await build_world(
        nursery,
        tls_ca,
        tmp_path,
        spawn,
        peeks_env={"PEEKPROXY_PEEKS__LINGER": "0.1", "PEEKPROXY_PEEKS__IDLE_TIMEOUT": "1s"},
    )
    room_id = world.create_room("11", topic="before")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    token = (await world.sync(limit=3))["next_batch"]
    # The device stops syncing: after idle_timeout + linger the remote peek is DELETEd.
    await world.daemon.wait_for_log(rb"is dormant")
    await world.daemon.wait_for_log(rb"stopped peek")
    assert len(world.log_of("delete")) == 1
    for i in range(6):
        world.send(room_id, f"while idle {i}")
    world.testbed.send(
        room_id,
        sender="admin",
        type="m.room.topic",
        content={"topic": "changed while idle"},
        state_key="",
    )
    restored = await world.sync(since=token, limit=3)
    room = restored["rooms"]["peek"][room_id]
    assert room["timeline"]["limited"] is True and room["timeline"]["prev_batch"]
    topics = [
        e["content"]["topic"]
        for e in [*room["state"]["events"], *room["timeline"]["events"]]
        if e["type"] == "m.room.topic"
    ]
    assert topics == ["changed while idle"]
    assert len(world.log_of("start")) == 2  # the remote peek was restored


async def test_encrypted_rooms_are_refused_and_repeeking_is_idempotent(world: PeekWorld) -> None:
    encrypted = world.create_room("10", encrypted=True)
    refused = await world.peek(encrypted, hints=[TESTBED])
    assert refused.status_code == 403 and refused.json()["errcode"] == "M_FORBIDDEN"
    room_id = world.create_room("11")
    token = (await world.sync())["next_batch"]
    first = await world.peek(room_id, hints=[TESTBED])
    again = await world.peek(room_id, hints=[TESTBED])
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json() == {"room_id": room_id}
    assert len(world.log_of("start")) == 1  # one federation subscription
    event_id = world.send(room_id, "once")
    await world.wait_delivered(event_id)
    room = (await world.sync(since=token))["rooms"]["peek"][room_id]
    ids = [e["event_id"] for e in room["timeline"]["events"]]
    assert len(ids) == len(set(ids)) and ids[-1] == event_id

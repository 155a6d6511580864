"""The delegation API's read endpoints (messages, state, event), ``peek_room`` and the peek
rate limit, end to end: peekproxy as a child process, the testbed as the remote."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio
import trustme

from peekproxy.api.delegation import TokenBucket
from tests.conftest import Spawn
from tests.peek_world import SECRET, TESTBED, PeekWorld, build_world

ALICE = "@alice:peekproxy.test"


@pytest.fixture
async def world(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> PeekWorld:
    return await build_world(
        nursery, tls_ca, tmp_path, spawn, peeks_env={"PEEKPROXY_PEEKS__LINGER": "0.2"}
    )


async def call(
    world: PeekWorld,
    method: str,
    path: str,
    *,
    device: str = "D1",
    params: dict[str, str] | None = None,
    json: Any = None,
) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as http:
        return await http.request(
            method,
            f"{world.daemon.client}/_peekproxy/v1{path}",
            params={"user_id": ALICE, "device_id": device, **(params or {})},
            json=json,
            headers={"Authorization": f"Bearer {SECRET}"},
        )


async def messages(
    world: PeekWorld, room_id: str, *, device: str = "D1", **params: str
) -> httpx.Response:
    return await call(
        world, "GET", f"/rooms/{quote(room_id, safe='')}/messages", device=device, params=params
    )


def bodies(chunk: list[dict[str, Any]]) -> list[str | None]:
    return [e["content"].get("body") for e in chunk]


async def test_messages_pages_back_from_prev_batch(world: PeekWorld) -> None:
    room_id = world.create_room("10", name="History")
    world.send(room_id, "before peek")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    sent = [world.send(room_id, f"m{i}") for i in range(12)]
    await world.wait_delivered(*sent)
    room = (await world.sync(limit=3))["rooms"]["peek"][room_id]
    assert [e["content"]["body"] for e in room["timeline"]["events"]] == ["m9", "m10", "m11"]
    token = room["timeline"]["prev_batch"]

    pages: list[list[dict[str, Any]]] = []
    while token is not None and len(pages) < 10:
        response = await messages(world, room_id, **{"from": token, "dir": "b", "limit": "4"})
        assert response.status_code == 200, response.text
        page = response.json()
        assert page["start"] == token
        assert all(e["room_id"] == room_id for e in page["chunk"])
        pages.append(page["chunk"])
        token = page.get("end")
    assert [bodies(p) for p in pages[:2]] == [["m8", "m7", "m6", "m5"], ["m4", "m3", "m2", "m1"]]
    # The last page reaches the start of what peekproxy stores (the event current when the
    # peek began); the remote's /backfill fills the page with what precedes it, unstored.
    last = pages[2]
    assert len(pages) == 3 and len(last) == 4
    assert bodies(last[:2]) == ["m0", "before peek"]
    assert [e["type"] for e in last[2:]] == ["m.room.name", "m.room.history_visibility"]
    assert all(e["unsigned"]["age"] >= 0 and e["sender"] for e in last)
    assert len({e["event_id"] for p in pages for e in p}) == sum(len(p) for p in pages)

    # Forward from the start of the first page: oldest first.
    first = await messages(world, room_id, **{"from": room["timeline"]["prev_batch"], "dir": "f"})
    assert first.status_code == 200 and bodies(first.json()["chunk"]) == ["m9", "m10", "m11"]
    # The default direction is backwards, the default limit 10.
    default = await messages(world, room_id, **{"from": room["timeline"]["prev_batch"]})
    assert bodies(default.json()["chunk"])[:3] == ["m8", "m7", "m6"]
    assert len(default.json()["chunk"]) == 10


async def test_messages_bad_parameters(world: PeekWorld) -> None:
    room_id = world.create_room("11")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    for params in (
        {"from": "junk"},
        {"from": "pp1_01"},
        {"from": "pp1_1", "dir": "x"},
        {"from": "pp1_1", "limit": "-1"},
        {"from": "pp1_1", "to": "s72_1"},
        {"from": "pp1_999999999"},  # from the future
    ):
        response = await messages(world, room_id, **params)
        assert response.status_code == 400, params
        assert response.json()["errcode"] == "M_INVALID_PARAM", params


async def test_a_device_not_peeking_is_forbidden(world: PeekWorld) -> None:
    room_id = world.create_room("12", name="Private to D1")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    token = (await world.sync())["next_batch"]
    state = await call(world, "GET", f"/rooms/{quote(room_id, safe='')}/state")
    some_event = state.json()[0]["event_id"]
    paths = [
        f"/rooms/{quote(room_id, safe='')}/messages?from={token}",
        f"/rooms/{quote(room_id, safe='')}/state",
        f"/rooms/{quote(room_id, safe='')}/event/{quote(some_event, safe='')}",
    ]
    for path in paths:
        other = await call(world, "GET", path, device="D2")
        assert other.status_code == 403 and other.json()["errcode"] == "M_FORBIDDEN", path
        assert (await call(world, "GET", path)).status_code == 200, path
    assert (await world.unpeek(room_id)).status_code == 200
    for path in paths:
        after = await call(world, "GET", path)
        assert after.status_code == 403 and after.json()["errcode"] == "M_FORBIDDEN", path


async def test_state_and_event(world: PeekWorld) -> None:
    room_id = world.create_room("10", name="Stateful", topic="A topic")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    state = await call(world, "GET", f"/rooms/{quote(room_id, safe='')}/state")
    assert state.status_code == 200
    events = state.json()
    by_key = {(e["type"], e["state_key"]): e for e in events}
    assert {("m.room.create", ""), ("m.room.name", ""), ("m.room.topic", "")} <= set(by_key)
    assert by_key[("m.room.topic", "")]["content"]["topic"] == "A topic"
    assert all(e["room_id"] == room_id for e in events)

    message_id = world.send(room_id, "fetch me")
    await world.wait_delivered(message_id)
    one = await call(
        world, "GET", f"/rooms/{quote(room_id, safe='')}/event/{quote(message_id, safe='')}"
    )
    assert one.status_code == 200
    body = one.json()
    assert body["event_id"] == message_id and body["room_id"] == room_id
    assert body["content"]["body"] == "fetch me" and body["type"] == "m.room.message"
    create_id = by_key[("m.room.create", "")]["event_id"]
    create = await call(
        world, "GET", f"/rooms/{quote(room_id, safe='')}/event/{quote(create_id, safe='')}"
    )
    assert create.status_code == 200 and create.json()["type"] == "m.room.create"
    unknown = await call(
        world, "GET", f"/rooms/{quote(room_id, safe='')}/event/{quote('$nope', safe='')}"
    )
    assert unknown.status_code == 404 and unknown.json()["errcode"] == "M_NOT_FOUND"


async def test_peek_room(world: PeekWorld) -> None:
    room_id = world.create_room("11")
    before = int(time.time() * 1000)
    response = await call(world, "POST", "/peek_room", json={"room": room_id, "servers": [TESTBED]})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == {"room_id", "peek_expiry_ts"} and answer["room_id"] == room_id
    # peek_expiry_ts = now + peeks.idle_timeout (default 10 min).
    assert before + 600_000 <= answer["peek_expiry_ts"] <= int(time.time() * 1000) + 600_000
    assert room_id in (await world.sync())["rooms"]["peek"]

    unknown = await call(
        world, "POST", "/peek_room", json={"room": "!nope:testbed.test", "servers": [TESTBED]}
    )
    assert unknown.status_code == 404 and unknown.json()["errcode"] == "M_NOT_FOUND"
    malformed = await call(world, "POST", "/peek_room", json={"room": "nope"})
    assert malformed.status_code == 400 and malformed.json()["errcode"] == "M_INVALID_PARAM"
    missing = await call(world, "POST", "/peek_room", json={"servers": [TESTBED]})
    assert missing.status_code == 400 and missing.json()["errcode"] == "M_MISSING_PARAM"
    wrong = await call(world, "POST", "/peek_room", json={"room": room_id, "servers": "x"})
    assert wrong.status_code == 400 and wrong.json()["errcode"] == "M_BAD_JSON"


async def test_messages_fill_an_idle_gap_from_backfill(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    world = await build_world(
        nursery,
        tls_ca,
        tmp_path,
        spawn,
        peeks_env={"PEEKPROXY_PEEKS__LINGER": "0.1", "PEEKPROXY_PEEKS__IDLE_TIMEOUT": "1s"},
    )
    room_id = world.create_room("11")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    seen = world.send(room_id, "seen before idle")
    await world.wait_delivered(seen)
    await world.sync()
    await world.daemon.wait_for_log(rb"stopped peek")
    for i in range(5):
        world.send(room_id, f"while idle {i}")
    world.send(room_id, "latest")
    restored = (await world.sync(limit=3))["rooms"]["peek"][room_id]
    assert restored["timeline"]["limited"] is True
    assert [e["content"].get("body") for e in restored["timeline"]["events"]] == ["latest"]
    token = restored["timeline"]["prev_batch"]
    # The gap: filled from the remote's /backfill (not stored); then stored history again.
    gap = await messages(world, room_id, **{"from": token, "limit": "5"})
    assert gap.status_code == 200
    assert bodies(gap.json()["chunk"]) == [f"while idle {i}" for i in (4, 3, 2, 1, 0)]
    older = await messages(world, room_id, **{"from": gap.json()["end"], "limit": "1"})
    assert bodies(older.json()["chunk"]) == ["seen before idle"]
    assert ("gap", None) in world.stream(room_id)
    assert not any(b and b.startswith("while idle") for _, b in world.stream(room_id))


async def test_peek_rate_limit(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    world = await build_world(
        nursery,
        tls_ca,
        tmp_path,
        spawn,
        peeks_env={
            "PEEKPROXY_PEEKS__RATE_LIMIT_BURST": "2",
            "PEEKPROXY_PEEKS__RATE_LIMIT_PER_SECOND": "0.1",
        },
    )
    rooms = [world.create_room("10") for _ in range(3)]
    assert (await world.peek(rooms[0], hints=[TESTBED])).status_code == 200
    second = await call(world, "POST", "/peek_room", json={"room": rooms[1], "servers": [TESTBED]})
    assert second.status_code == 200
    limited = await world.peek(rooms[2], hints=[TESTBED])
    assert limited.status_code == 429
    assert limited.json()["errcode"] == "M_LIMIT_EXCEEDED"
    assert 0 < limited.json()["retry_after_ms"] <= 10_000
    assert int(limited.headers["Retry-After"]) >= 1
    # Per user: another user is not limited.
    other = await world.peek(rooms[2], user="@bob:peekproxy.test", hints=[TESTBED])
    assert other.status_code == 200


def test_token_bucket() -> None:
    now = [0.0]
    bucket = TokenBucket(0.5, 2, clock=lambda: now[0])
    assert bucket.take("a") is None and bucket.take("a") is None
    assert bucket.take("a") == 2000
    assert bucket.take("b") is None  # per key
    now[0] = 1.0
    assert bucket.take("a") == 1000
    now[0] = 2.0
    assert bucket.take("a") is None
    assert bucket.take("a") == 2000
    with pytest.raises(ValueError):
        TokenBucket(0, 1)

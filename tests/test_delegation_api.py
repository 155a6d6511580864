"""The delegation API's read endpoints (messages, state, event), ``peek_room`` and the peek
rate limit, end to end: peekproxy as a child process, the testbed as the remote."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio
import trustme

from peekproxy.api.delegation_params import TokenBucket
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


def room_history(world: PeekWorld, room_id: str) -> list[str]:
    """The testbed's events of the room, in DAG order (its rooms are linear)."""
    return list(world.testbed.rooms[room_id].event_ids)


async def page_through(
    world: PeekWorld,
    room_id: str,
    token: str | None,
    limits: Iterator[int],
    *,
    dir: str = "b",
    keep_alive: bool = False,
) -> list[dict[str, Any]]:
    """Every event from ``token`` on, one ``/messages`` page at a time (page sizes from
    ``limits``), checking each page's ``start`` and that pagination ends. ``keep_alive``:
    sync between pages (only syncs keep a device from going idle)."""
    events: list[dict[str, Any]] = []
    for _ in range(1000):
        if keep_alive:
            await world.sync()
        params = {"dir": dir, "limit": str(next(limits))} | ({"from": token} if token else {})
        response = await messages(world, room_id, **params)
        assert response.status_code == 200, response.text
        page = response.json()
        assert token is None or page["start"] == token
        assert all(e["room_id"] == room_id for e in page["chunk"])
        events += page["chunk"]
        token = page.get("end")
        if token is None or (dir == "f" and not page["chunk"]):
            return events
    raise AssertionError("pagination did not end")


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
    assert [bodies(p) for p in pages[:3]] == [
        ["m8", "m7", "m6", "m5"],
        ["m4", "m3", "m2", "m1"],
        ["m0", "before peek", None, None],
    ]
    # The peek stored the history before its latest event ("before peek"), fetched from the
    # remote's /backfill: paging runs on to the room's first event, then has no end.
    assert [e["event_id"] for p in pages for e in p] == room_history(world, room_id)[-4::-1]
    assert pages[-1][-1]["type"] == "m.room.create" and "end" not in page
    assert all(e["unsigned"]["age"] >= 0 and e["sender"] for p in pages for e in p)

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


async def make_gap(world: PeekWorld, room_id: str, lost: int, tag: str) -> None:
    """Withhold ``lost`` events, then send one whose ``get_missing_events`` the testbed
    answers with nothing: peekproxy records a gap of ``lost`` events before it."""
    world.testbed.faults.update({"withhold_next": lost, "missing_events_empty_next": 1})
    for i in range(lost):
        world.send(room_id, f"{tag} withheld {i}")
    await world.wait_delivered(world.send(room_id, f"{tag} after"))
    kept = [world.send(room_id, f"{tag} kept {i}") for i in range(20)]
    await world.wait_delivered(*kept)


@pytest.mark.slow
async def test_messages_page_across_two_nearby_gaps(world: PeekWorld) -> None:
    """Issue 10 item 6: two gaps with 21 stored events between them, paged back with small
    pages (each gap takes several backfill rounds) and with large ones (one /backfill
    answer spans both gaps): every event once, in DAG order."""
    for limit in (3, 30):
        room_id = world.create_room("10", name=f"Two gaps, pages of {limit}")
        assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
        await world.wait_delivered(world.send(room_id, "first"))
        await make_gap(world, room_id, 5, "one")
        await make_gap(world, room_id, 4, "two")
        world.send(room_id, "newest")
        await world.wait_delivered(room_history(world, room_id)[-1])
        assert world.stream(room_id).count(("gap", None)) == 2
        head = (await world.sync())["next_batch"]
        paged = await page_through(world, room_id, head, itertools.repeat(limit))
        assert [e["event_id"] for e in paged] == room_history(world, room_id)[::-1]
        # Filled gaps are closed: paging again asks nothing and stops nowhere.
        again = await messages(world, room_id, **{"from": head, "limit": "100"})
        assert [e["event_id"] for e in again.json()["chunk"]] == room_history(world, room_id)[::-1]
        assert "end" not in again.json()
        # Forward through the filled gaps, from the start: the same events, oldest first.
        forward = await page_through(world, room_id, None, itertools.repeat(limit), dir="f")
        assert [e["event_id"] for e in forward] == room_history(world, room_id)


@pytest.mark.slow
async def test_messages_page_across_what_an_idle_device_missed(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    """Issue 10 item 6: a device idle while 60 events happen; its restored peek shows the
    newest, and paging back from its prev_batch crosses the gap (more events than one
    /backfill round gives) to what it saw before, then to the room's start."""
    world = await build_world(
        nursery,
        tls_ca,
        tmp_path,
        spawn,
        peeks_env={"PEEKPROXY_PEEKS__LINGER": "0.1", "PEEKPROXY_PEEKS__IDLE_TIMEOUT": "1s"},
    )
    room_id = world.create_room("11")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    await world.wait_delivered(world.send(room_id, "seen before idle"))
    token = (await world.sync())["next_batch"]
    await world.daemon.wait_for_log(rb"stopped peek")
    for i in range(60):
        world.send(room_id, f"while idle {i}")
    world.send(room_id, "latest")
    restored = (await world.sync(since=token, limit=3))["rooms"]["peek"][room_id]
    assert restored["timeline"]["limited"] is True
    assert bodies(restored["timeline"]["events"]) == ["while idle 58", "while idle 59", "latest"]
    # The restore fetched 50 events before "latest": 10 are still missing behind a gap.
    assert world.stream(room_id)[-52] == ("gap", None)
    paged = await page_through(
        world, room_id, restored["timeline"]["prev_batch"], itertools.repeat(4), keep_alive=True
    )
    assert [e["event_id"] for e in paged] == room_history(world, room_id)[-4::-1]
    assert bodies(paged[54:61]) == [f"while idle {i}" for i in (3, 2, 1, 0)] + [
        "seen before idle",
        None,
        None,
    ]


@pytest.mark.slow
async def test_messages_page_a_v12_room_to_its_create_event(world: PeekWorld) -> None:
    """Issue 10 item 6: room version 12's m.room.create has no room_id; backfilled, it is
    the last event of the history (shown with the room's ID, as every event)."""
    room_id = world.create_room("12", name="Version 12")
    for i in range(70):  # more than the peek's first view fetches
        world.send(room_id, f"old {i}")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    head = (await world.sync())["next_batch"]
    paged = await page_through(world, room_id, head, itertools.repeat(20))
    assert [e["event_id"] for e in paged] == room_history(world, room_id)[::-1]
    create = paged[-1]
    assert create["type"] == "m.room.create" and create["room_id"] == room_id
    assert "room_id" not in world.testbed.rooms[room_id].events[0]


@pytest.mark.slow
async def test_messages_random_gaps_and_page_sizes(world: PeekWorld) -> None:
    """Property: whatever the gaps (random sizes and spacing, some before the peek's first
    view, some after) and page sizes, paging back from the head yields exactly the room's
    events in reverse DAG order, and paging forward then yields them in order."""
    for seed in range(3):
        rng = random.Random(seed)
        room_id = world.create_room(rng.choice(["10", "11", "12"]))
        for i in range(rng.choice([0, 10, 55, 80])):
            world.send(room_id, f"before peek {i}")
        assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
        for n in range(rng.randint(1, 4)):
            for i in range(rng.randint(0, 4)):
                await world.wait_delivered(world.send(room_id, f"{n} sent {i}"))
            await make_gap(world, room_id, rng.randint(1, 8), f"{n}")
        head = (await world.sync())["next_batch"]
        sizes = (rng.choice([1, 2, 3, 5, 8, 13, 40, 100]) for _ in itertools.count())
        paged = await page_through(world, room_id, head, sizes)
        assert [e["event_id"] for e in paged] == room_history(world, room_id)[::-1], seed
        forward = await page_through(world, room_id, None, sizes, dir="f")
        assert [e["event_id"] for e in forward] == room_history(world, room_id), seed


@pytest.mark.slow
async def test_first_sync_after_a_peek_shows_the_newest_events(world: PeekWorld) -> None:
    """Issue 10 item 7: the first sync after a peek shows up to the timeline limit of the
    newest events, fetched from the remote, limited with a prev_batch that pages on."""
    room_id = world.create_room("10", name="Thirty", topic="old topic")
    for i in range(30):
        world.send(room_id, f"message {i}")
    world.testbed.send(
        room_id, sender="admin", type="m.room.topic", content={"topic": "new"}, state_key=""
    )
    world.send(room_id, "newest")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    room = (await world.sync(limit=10))["rooms"]["peek"][room_id]
    timeline = room["timeline"]
    assert [e["event_id"] for e in timeline["events"]] == room_history(world, room_id)[-10:]
    assert timeline["limited"] is True
    # Current state, not the state of the history: the old topic is history only.
    state = {(e["type"], e["state_key"]): e for e in room["state"]["events"]}
    assert ("m.room.topic", "") not in state  # the new topic event is in the timeline
    assert {("m.room.create", ""), ("m.room.name", "")} <= set(state)
    current = await call(world, "GET", f"/rooms/{quote(room_id, safe='')}/state")
    topics = [e["content"] for e in current.json() if e["type"] == "m.room.topic"]
    assert topics == [{"topic": "new"}]
    paged = await page_through(world, room_id, timeline["prev_batch"], itertools.repeat(7))
    assert [e["event_id"] for e in paged] == room_history(world, room_id)[-11::-1]
    # Another device's first sync with a larger limit: more of the same newest events.
    assert (await world.peek(room_id, device="D2", hints=[TESTBED])).status_code == 200
    wide = (await world.sync(device="D2", limit=25))["rooms"]["peek"][room_id]["timeline"]
    assert [e["event_id"] for e in wide["events"]] == room_history(world, room_id)[-25:]
    assert wide["limited"] is True
    # A small room: its whole history, down to m.room.create, and not limited.
    small = world.create_room("11")
    world.send(small, "only message")
    assert (await world.peek(small, hints=[TESTBED])).status_code == 200
    first = (await world.sync(limit=20))["rooms"]["peek"][small]["timeline"]
    assert [e["event_id"] for e in first["events"]] == room_history(world, small)
    assert first["limited"] is False


async def test_first_sync_runs_past_a_gap_over_which_nothing_is_missing(
    world: PeekWorld,
) -> None:
    """Item 7 after a re-peek: the room was peeked, released (its remote peek DELETEd) and
    peeked again by another device; the first view's history joined what was held, so that
    device's first sync shows its timeline limit of newest events across the re-peek."""
    room_id = world.create_room("10")
    for i in range(20):
        world.send(room_id, f"early {i}")
    assert (await world.peek(room_id, device="D2", hints=[TESTBED])).status_code == 200
    await world.sync(device="D2")
    assert (await world.unpeek(room_id, device="D2")).status_code == 200
    await world.daemon.wait_for_log(rb"stopped peek")  # nobody peeks: DELETEd after linger
    for i in range(3):
        world.send(room_id, f"later {i}")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    assert ("gap", None) in world.stream(room_id)  # the re-peek is a gap (decision 4) ...
    timeline = (await world.sync(limit=10))["rooms"]["peek"][room_id]["timeline"]
    # ... over which nothing is missing: the new device sees the 10 newest events.
    assert [e["event_id"] for e in timeline["events"]] == room_history(world, room_id)[-10:]
    assert timeline["limited"] is True
    paged = await page_through(world, room_id, timeline["prev_batch"], itertools.repeat(7))
    assert [e["event_id"] for e in paged] == room_history(world, room_id)[-11::-1]


@pytest.mark.slow
async def test_history_when_the_remote_backfill_fails(world: PeekWorld) -> None:
    """A failed first-view fetch does not fail the peek: the first sync is limited with a
    prev_batch; a /messages page whose backfill fails is a 502 and the same token works
    once the remote answers again."""
    room_id = world.create_room("10")
    for i in range(12):
        world.send(room_id, f"m{i}")
    world.testbed.faults.update({"backfill_fail_next": 2})
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    timeline = (await world.sync(limit=10))["rooms"]["peek"][room_id]["timeline"]
    assert bodies(timeline["events"]) == ["m11"] and timeline["limited"] is True
    failed = await messages(world, room_id, **{"from": timeline["prev_batch"], "limit": "5"})
    assert failed.status_code == 502 and failed.json()["errcode"] == "M_UNKNOWN"
    # The failures back the testbed off for a moment (federation.backoff_initial, 0.1 s
    # here), and an injected failure may be left: the same token is answered once both
    # are over.
    for _ in range(50):
        again = await messages(world, room_id, **{"from": timeline["prev_batch"], "limit": "5"})
        if again.status_code == 200:
            break
        assert again.status_code == 502 and again.json()["errcode"] == "M_UNKNOWN"
        await trio.sleep(0.1)
    paged = await page_through(world, room_id, timeline["prev_batch"], itertools.repeat(5))
    assert [e["event_id"] for e in paged] == room_history(world, room_id)[-2::-1]


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


async def test_peek_and_unpeek_take_no_body(world: PeekWorld) -> None:
    """The body of /peek and /unpeek is optional (docs/delegation-api.md): none is `{}`."""
    room_id = world.create_room("10")
    room = quote(room_id, safe="")
    peeked = await call(world, "POST", f"/peek/{room}", params={"server_name": TESTBED})
    assert peeked.status_code == 200, peeked.text
    unpeeked = await call(world, "POST", f"/rooms/{room}/unpeek")
    assert unpeeked.status_code == 200 and unpeeked.json() == {}

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
    shared = world.create_room("10", history_visibility="shared")
    response = await world.peek(shared, hints=[TESTBED])
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

"""Input checks of the delegation API (issue 10, items 15 and 16), over real sockets
against a running daemon: ``user_id`` / ``device_id`` given once and at most 255 bytes
(never logged in full), server hints that are server names (refused before any lookup,
never stored). No request may end in a 500."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio
import trustme

from peekproxy.api.errors import MatrixError
from tests.conftest import Spawn
from tests.peek_world import NO_PEEK, SECRET, TESTBED, PeekWorld, build_world

ALICE = "@alice:peekproxy.test"
AUTH = {"Authorization": f"Bearer {SECRET}"}
#: Not server names: spaces, a path, an empty name, a bad port, a user ID, an open bracket,
#: over 255 bytes.
BAD_HINTS = [
    "bad host.test",
    "testbed.test/evil",
    "",
    "testbed.test:99999",
    "@alice:testbed.test",
    "[::1",
    "h" * 300 + ".test",
]


@pytest.fixture
async def world(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> PeekWorld:
    return await build_world(nursery, tls_ca, tmp_path, spawn)


async def request(
    world: PeekWorld,
    method: str,
    path: str,
    params: list[tuple[str, str]],
    json: Any = None,
) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.request(
            method,
            f"{world.daemon.client}/_peekproxy/v1{path}",
            params=tuple(params),
            json=json,
            headers=AUTH,
        )
    assert response.status_code != 500, response.text
    return response


def assert_error(response: httpx.Response, status: int, errcode: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["errcode"] == errcode, body
    return body


@pytest.mark.slow
async def test_user_and_device_ids_given_once_and_bounded(world: PeekWorld) -> None:
    room_id = world.create_room("10")
    room = quote(room_id, safe="")
    endpoints: list[tuple[str, str, Any]] = [
        ("POST", f"/peek/{room}", {"servers": [TESTBED]}),
        ("POST", "/peek_room", {"room": room_id, "servers": [TESTBED]}),
        ("POST", f"/rooms/{room}/unpeek", {}),
        ("GET", "/sync", None),
        ("GET", f"/rooms/{room}/state", None),
        ("GET", f"/rooms/{room}/messages", None),
    ]
    long_user = "@" + "u" * 300 + ":peekproxy.test"
    long_device = "D" * 256
    longest_device = "D" * 255
    cases: list[tuple[list[tuple[str, str]], str]] = [
        (
            [("user_id", ALICE), ("user_id", "@mallory:peekproxy.test"), ("device_id", "D1")],
            "user_id",
        ),
        ([("user_id", ALICE), ("device_id", "D1"), ("device_id", "D2")], "device_id"),
        ([("user_id", ALICE), ("user_id", ALICE), ("device_id", "D1")], "user_id"),
        ([("user_id", long_user), ("device_id", "D1")], "user_id"),
        ([("user_id", ALICE), ("device_id", long_device)], "device_id"),
        ([("user_id", ALICE), ("device_id", "é" * 128)], "device_id"),  # 256 bytes
    ]
    for method, path, body in endpoints:
        for params, name in cases:
            response = await request(world, method, path, params, body)
            error = assert_error(response, 400, "M_INVALID_PARAM")
            assert name in error["error"], (path, error)
            assert long_user not in error["error"] and long_device not in error["error"]
    # Nothing was peeked by any of those requests.
    assert world.log_of("start") == []
    assert world.rows("SELECT * FROM device_peeks") == []

    # 255 bytes is fine.
    ok = await request(
        world,
        "POST",
        f"/peek/{room}",
        [("user_id", ALICE), ("device_id", longest_device)],
        {"servers": [TESTBED]},
    )
    assert ok.status_code == 200, ok.text
    synced = await request(
        world, "GET", "/sync", [("user_id", ALICE), ("device_id", longest_device)]
    )
    assert room_id in synced.json()["rooms"]["peek"]

    # Over-long IDs in the path (room ID, alias, event ID) are refused as well.
    long_room = "!" + "r" * 300 + ":testbed.test"
    long_paths = [
        ("POST", f"/peek/{quote(long_room, safe='')}", {}),
        ("POST", f"/peek/{quote('#' + 'a' * 300 + ':testbed.test', safe='')}", {}),
        ("POST", f"/rooms/{quote(long_room, safe='')}/unpeek", {}),
        ("GET", f"/rooms/{quote(long_room, safe='')}/state", None),
        ("POST", "/peek_room", {"room": long_room}),
    ]
    for method, path, body in long_paths:
        response = await request(
            world, method, path, [("user_id", ALICE), ("device_id", "D1")], body
        )
        assert_error(response, 400, "M_INVALID_PARAM")

    # Over-long IDs never reach the log in full: the access log has no query string and
    # cuts long path segments; our own lines quote at most 40 characters.
    await world.daemon.wait_for_log(rb"peeks " + room_id.encode())
    marker = await request(world, "GET", "/rooms/!last:x/state", [("user_id", ALICE)])
    assert_error(marker, 400, "M_MISSING_PARAM")
    await world.daemon.wait_for_log(rb'"GET /_peekproxy/v1/rooms/!last:x/state HTTP/1.1" 400')
    log = world.daemon.log
    assert re.search(r"/rooms/!rrrrr+…\[314 bytes\]/unpeek", log), log[-2000:]
    assert long_user not in log and long_device not in log and long_room not in log
    assert "u" * 41 not in log and "r" * 41 not in log and "a" * 41 not in log


@pytest.mark.slow
async def test_server_hints_must_be_server_names(world: PeekWorld) -> None:
    room_id = world.create_room("10")
    room = quote(room_id, safe="")
    who = [("user_id", ALICE), ("device_id", "D1")]
    alias = quote(f"#somewhere:{NO_PEEK}", safe="")
    for bad in BAD_HINTS:
        attempts = [
            # A valid hint first: today the bad one is silently dropped and the peek works.
            ("POST", f"/peek/{room}", [*who, ("server_name", TESTBED), ("server_name", bad)], {}),
            ("POST", f"/peek/{room}", who, {"servers": [TESTBED, bad]}),
            ("POST", "/peek_room", who, {"room": room_id, "servers": [TESTBED, bad]}),
            ("POST", "/peek_room", [*who, ("server_name", bad)], {"room": room_id}),
            # An alias: refused before its directory lookup.
            ("POST", f"/peek/{alias}", [*who, ("server_name", bad)], {}),
        ]
        for method, path, params, body in attempts:
            response = await request(world, method, path, params, body)
            error = assert_error(response, 400, "M_INVALID_PARAM")
            assert "server hint" in error["error"] and repr(bad[:40]) in error["error"], error
    # Never looked up, never stored: no PUT at the testbed, no directory query at NO_PEEK,
    # no subscription with those candidates, no device peek.
    assert world.log_of("start") == []
    assert world.nopeek_requests == []
    assert world.rows("SELECT room_id FROM subscriptions") == []
    assert world.rows("SELECT * FROM device_peeks") == []
    # Server names of every form are accepted (IP literals, ports); the peek goes through
    # the first that works.
    fine = await request(
        world,
        "POST",
        f"/peek/{room}",
        [*who, ("server_name", "127.0.0.1:1"), ("server_name", "[::1]:1")],
        {"servers": [TESTBED]},
    )
    assert fine.status_code == 200, fine.text


def test_device_params_unit() -> None:
    from peekproxy.api.delegation_params import check_hints, device_params

    def params(**given: list[str]) -> Any:
        return lambda name: given.get(name, [])

    assert device_params(params(user_id=[ALICE], device_id=["D1"])) == (ALICE, "D1")
    for given, errcode in [
        ({"user_id": [ALICE]}, "M_MISSING_PARAM"),
        ({"user_id": [ALICE], "device_id": [""]}, "M_MISSING_PARAM"),
        ({"user_id": [ALICE, ALICE], "device_id": ["D1"]}, "M_INVALID_PARAM"),
        ({"user_id": [ALICE], "device_id": ["D1", "D1"]}, "M_INVALID_PARAM"),
        ({"user_id": ["alice"], "device_id": ["D1"]}, "M_INVALID_PARAM"),
        ({"user_id": [ALICE], "device_id": ["x" * 256]}, "M_INVALID_PARAM"),
    ]:
        with pytest.raises(MatrixError) as caught:
            device_params(params(**given))
        assert caught.value.status == 400 and caught.value.errcode == errcode, given
        assert "x" * 41 not in caught.value.error
    check_hints(["a.test", "a.test:8448", "1.2.3.4", "[::1]:8448"])
    from peekproxy.logs import short_path

    assert short_path("/a/" + "é" * 128 + "/b") == "/a/" + "é" * 40 + "…[256 bytes]/b"
    assert short_path("/a/" + "x" * 255) == "/a/" + "x" * 255
    for bad in BAD_HINTS:
        with pytest.raises(MatrixError) as caught:
            check_hints(["ok.test", bad])
        assert caught.value.errcode == "M_INVALID_PARAM"


async def test_overlong_room_ids_and_aliases_are_not_echoed_in_full(world: PeekWorld) -> None:
    """A 5,000-character alias or room ID is refused with 400, and the error quotes only its
    start (as the logs do)."""
    me = [("user_id", "@alice:peekproxy.test"), ("device_id", "D1")]
    for value in ("#" + "a" * 5000 + ":x.test", "!" + "b" * 5000 + ":x.test"):
        path = quote(value, safe="")
        for method, route in (("POST", f"/peek/{path}"), ("POST", f"/rooms/{path}/unpeek")):
            if route.startswith("/rooms/") and value.startswith("#"):
                continue  # unpeek takes room IDs only
            body = assert_error(
                await request(world, method, route, me, json={}), 400, "M_INVALID_PARAM"
            )
            assert len(body["error"]) < 300, body["error"][:400]

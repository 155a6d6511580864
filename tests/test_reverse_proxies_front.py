"""Clients through the shipped reverse-proxy configurations to peekproxy's merged front
``/sync`` (docs/reverse-proxy.md, docs/front.md): matrix-nio and Element's SDK see what they see
at Synapse directly (plus the peeked room), and a peekproxy killed under long-polling clients
costs them nothing: Synapse answers, the peek section resumes when peekproxy is back."""

from __future__ import annotations

import asyncio
import signal
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio

from tests.conftest import Spawn
from tests.front_support import bodies, client_api, create_room, send_text, sync
from tests.js_sdk import JsSession, login, node_harness
from tests.proxies import KINDS, Fronted
from tests.synapse import Synapse
from tests.test_front_nio import _login, _session


async def test_nio_through_nginx_equals_a_direct_sync(
    synapse: Synapse,
    fronted: Fronted,
) -> None:
    """The scripted nio session of tests/test_front_nio.py, its FRONT device syncing through
    nginx -> peekproxy: joined rooms, timelines, account data and to-device messages equal
    those of the DIRECT device at Synapse."""
    world = fronted.world
    nginx = await fronted.proxy("nginx")
    synapse.register("nginx-nio")
    user = f"@nginx-nio:{synapse.server_name}"
    tokens = {
        device: _login(synapse, "nginx-nio", device) for device in ("FRONT", "DIRECT", "SENDER")
    }
    room_id, seen, names, joined = await trio.to_thread.run_sync(
        lambda: asyncio.run(_session(nginx.url, synapse.client, user, tokens))
    )
    front, direct = seen["FRONT"], seen["DIRECT"]
    assert joined["FRONT"] == joined["DIRECT"] == [room_id]
    assert names["FRONT"] == names["DIRECT"] == "Renamed"
    assert front.timelines == direct.timelines and len(front.timelines[room_id]) >= 8
    assert front.account_data == direct.account_data
    assert front.to_device == direct.to_device == [("org.example.ping", {"hello": 1})]
    # the FRONT device's syncs went through peekproxy, not around it
    await world.daemon.wait_for_log(rb'"GET /_matrix/client/v3/sync HTTP/1.1" 200', 10)


async def test_js_sdk_through_nginx_sees_the_same_plus_the_peeked_room(
    synapse: Synapse,
    fronted: Fronted,
) -> None:
    node = node_harness()
    world = fronted.world
    nginx = await fronted.proxy("nginx")
    token = synapse.register("js-front")
    remote = world.create_room("10", name="Remote")
    world.send(remote, "remote history")
    rooms = [await create_room(synapse, token, name=f"js {n}") for n in range(2)]
    await send_text(synapse, token, rooms[0], "before the clients start", "b1")
    async with httpx.AsyncClient(base_url=synapse.client, timeout=60) as direct:
        devices = [await login(direct, "js-front") for _ in range(2)]
    peeked = await client_api(
        nginx.url,
        devices[1]["access_token"],
        "POST",
        f"/_matrix/client/v3/peek/{quote(remote, safe='')}?server_name=testbed.test",
        {},
    )
    assert peeked.status_code == 200, peeked.text
    sessions = [
        JsSession(node, synapse.client, devices[0], "the last one"),
        JsSession(node, nginx.url, devices[1], "the last one"),
    ]
    async with trio.open_nursery() as clients:
        for session in sessions:
            clients.start_soon(session.run)
        with trio.fail_after(60):
            for session in sessions:
                await session.prepared.wait()
        await world.wait_delivered(world.send(remote, "remote, live"))
        await send_text(synapse, token, rooms[1], "live, while they sync", "l1")
        await send_text(synapse, token, rooms[0], "the last one", "l2")
    at_synapse, through_nginx = (session.report for session in sessions)
    assert set(at_synapse["rooms"]) == set(rooms)
    assert through_nginx["rooms"] == at_synapse["rooms"]
    assert through_nginx["errors"] == []
    assert at_synapse["peeked"] == {}
    seen_remote = [e["body"] for e in through_nginx["peeked"][remote] if e["body"]]
    assert seen_remote == ["remote history", "remote, live"]


def peek_bodies(answer: dict[str, Any], room_id: str) -> list[str]:
    return bodies(answer.get("rooms", {}).get("peek", {}).get(room_id, {}))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
async def test_peekproxy_stopped_under_long_polling_clients(
    kind: str,
    stop: signal.Signals,
    synapse: Synapse,
    fronted: Fronted,
    spawn: Spawn,
) -> None:
    """kill -9 while a client long-polls through the proxy: the same request is answered by
    Synapse (no error, no initial sync), later syncs too. A restart's SIGTERM instead answers
    the long-poll at once with nothing new and its own ``since`` (the drain), and the next
    sync goes to Synapse. Either way, peekproxy back on the same database -> the peek
    section resumes with what was sent meanwhile, nothing repeated."""
    world = fronted.world
    proxy = await fronted.proxy(kind)
    token = synapse.register(f"stopped-{kind}-{stop.name}")
    joined = await create_room(synapse, token, name="Mine")
    remote = world.create_room("10", name="Remote")
    world.send(remote, "one")
    first = await sync(proxy.url, token)
    assert joined in first["rooms"]["join"]
    peeked = await client_api(
        proxy.url,
        token,
        "POST",
        f"/_matrix/client/v3/peek/{quote(remote, safe='')}?server_name=testbed.test",
        {},
    )
    assert peeked.status_code == 200, peeked.text
    shown = await sync(proxy.url, token, since=first["next_batch"], timeout_ms=20_000)
    assert peek_bodies(shown, remote) == ["one"]

    answers: list[dict[str, Any]] = []

    async def long_poll() -> None:
        answers.append(await sync(proxy.url, token, since=shown["next_batch"], timeout_ms=25_000))

    async with trio.open_nursery() as polls:
        polls.start_soon(long_poll)
        await trio.sleep(1)  # the long-poll waits inside peekproxy
        world.daemon.signal(stop)
        await world.daemon.wait()
        await trio.sleep(1)  # ... and is now waiting at Synapse
        await send_text(synapse, token, joined, "while peekproxy is down", "d1")
    [answer] = answers
    if stop == signal.SIGTERM:
        assert answer == {"next_batch": shown["next_batch"]}  # drained: a quiet answer
        answer = await sync(proxy.url, token, since=answer["next_batch"], timeout_ms=25_000)
    assert bodies(answer["rooms"]["join"][joined]) == ["while peekproxy is down"]
    assert "peek" not in answer["rooms"]
    world.send(remote, "two, meanwhile")
    later = await sync(proxy.url, token, since=answer["next_batch"])  # Synapse again
    assert joined not in later.get("rooms", {}).get("join", {})  # no initial sync

    world.daemon = await spawn(world.config, env=world.env)
    since, resumed = later["next_batch"], list[str]()
    with trio.fail_after(60):  # the proxy tries peekproxy again after its 10 s
        while not resumed:
            answer = await sync(proxy.url, token, since=since, timeout_ms=1000)
            since, resumed = answer["next_batch"], peek_bodies(answer, remote)
    assert resumed == ["two, meanwhile"]  # the event sent meanwhile; "one" not repeated


@pytest.mark.parametrize("kind", KINDS)
async def test_a_browser_syncs_through_the_front(
    kind: str,
    synapse: Synapse,
    fronted: Fronted,
) -> None:
    """What Element Web does before and with each /sync: a CORS preflight (answered by
    Synapse), then the request, whose answer (from peekproxy) carries one allowed origin."""
    world = fronted.world
    proxy = await fronted.proxy(kind)
    token = synapse.register(f"browser-{kind}")
    origin = {"Origin": "https://app.element.io"}
    async with httpx.AsyncClient(base_url=proxy.url, timeout=60) as http:
        preflight = await http.options(
            "/_matrix/client/v3/sync",
            headers=origin
            | {
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        synced = await http.get(
            "/_matrix/client/v3/sync",
            params={"timeout": "0"},
            headers=origin | {"Authorization": f"Bearer {token}"},
        )
    assert preflight.status_code in (200, 204), preflight.text
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert synced.status_code == 200 and "next_batch" in synced.json()
    assert synced.headers.get_list("access-control-allow-origin") == ["*"]
    await world.daemon.wait_for_log(rb'"GET /_matrix/client/v3/sync HTTP/1.1" 200', 10)

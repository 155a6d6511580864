"""Front mode end to end: the merged ``/sync`` over a real Synapse (docs/front.md).

peekproxy runs in front mode before the session's Synapse; the testbed hosts the remote
rooms a device peeks. Clients hold only Synapse's tokens."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio
import trustme

from tests.conftest import Spawn
from tests.front_support import (
    auth,
    bodies,
    client_api,
    create_room,
    front_world,
    peek,
    send_text,
    sync,
    without_ages,
)
from tests.support import serve_app
from tests.synapse import Synapse, free_tcp_port


async def test_peek_section_live_in_the_front_sync(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    world = await front_world(synapse, nursery, tls_ca, tmp_path, spawn)
    front = world.daemon.client
    token = synapse.register("front-live")
    joined = await create_room(synapse, token, name="Mine")
    remote = world.create_room("10", name="Remote")
    world.send(remote, "before the peek")

    first = await sync(front, token)
    assert joined in first["rooms"]["join"]
    assert "peek" not in first.get("rooms", {}) or first["rooms"]["peek"] == {}
    await peek(world, token, remote)
    # The peek is news: an incremental long-poll answers at once, with the room's state.
    shown = await sync(front, token, since=first["next_batch"], timeout_ms=20_000)
    assert remote in shown["rooms"]["peek"], shown
    entry = shown["rooms"]["peek"][remote]
    assert "m.room.name" in {
        e["type"] for e in entry["state"]["events"] + entry["timeline"]["events"]
    }
    # The token is Synapse's own: it works there directly.
    direct = await sync(synapse.client, token, since=shown["next_batch"])
    assert "peek" not in direct.get("rooms", {})

    # A long-poll through the front is woken by an event on the testbed.
    async def send_later() -> None:
        await trio.sleep(1)
        world.send(remote, "live")

    nursery.start_soon(send_later)
    started = trio.current_time()
    woken = await sync(front, token, since=shown["next_batch"], timeout_ms=25_000)
    assert trio.current_time() - started < 15
    assert bodies(woken["rooms"]["peek"][remote]) == ["live"]
    # Joined rooms keep working meanwhile, in the same answers as the peek news.
    await send_text(synapse, token, joined, "joined room message", "t1")
    await world.wait_delivered(world.send(remote, "beside it"))
    mine = await sync(front, token, since=woken["next_batch"], timeout_ms=10_000)
    assert bodies(mine["rooms"]["join"][joined]) == ["joined room message"]
    assert bodies(mine["rooms"]["peek"][remote]) == ["beside it"]
    # A retried request (the same since) gets the same peek news again: nothing lost.
    retried = await sync(front, token, since=woken["next_batch"])
    assert bodies(retried["rooms"]["peek"][remote]) == ["beside it"]
    assert bodies(retried["rooms"]["join"][joined]) == ["joined room message"]
    quiet = await sync(front, token, since=mine["next_batch"])
    assert remote not in quiet.get("rooms", {}).get("peek", {})  # nothing duplicated

    # Unpeek: the room goes to rooms.leave once.
    left = await client_api(
        front, token, "POST", f"/_matrix/client/v3/rooms/{quote(remote, safe='')}/unpeek", {}
    )
    assert left.status_code == 200
    after = await sync(front, token, since=mine["next_batch"], timeout_ms=10_000)
    assert remote in after["rooms"]["leave"]
    assert remote not in after["rooms"].get("peek", {})
    again = await sync(front, token, since=after["next_batch"])
    assert remote not in again.get("rooms", {}).get("leave", {})
    assert token not in world.daemon.log


async def test_front_sync_over_http2_and_errors(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    world = await front_world(synapse, nursery, tls_ca, tmp_path, spawn)
    token = synapse.register("front-h2")
    async with httpx.AsyncClient(http1=False, http2=True, timeout=60) as http:
        response = await http.get(
            f"{world.daemon.client}/_matrix/client/r0/sync",
            params={"timeout": "0"},
            headers=auth(token),
        )
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200 and "next_batch" in response.json()
    async with httpx.AsyncClient(base_url=world.daemon.client, timeout=60) as http:
        bad = await http.get("/_matrix/client/v3/sync", headers=auth("not-a-token"))
        bad_again = await http.get("/_matrix/client/v3/sync", headers=auth("not-a-token"))
        # The homeserver's own errors come back verbatim (a filter ID it does not know).
        unknown_filter = await http.get(
            "/_matrix/client/v3/sync", params={"filter": "987654"}, headers=auth(token)
        )
        ready = await http.get("/ready")
    for answer in (bad, bad_again):
        assert answer.status_code == 401 and answer.json()["errcode"] == "M_UNKNOWN_TOKEN"
    async with httpx.AsyncClient(base_url=synapse.client, timeout=60) as http:
        direct = await http.get(
            "/_matrix/client/v3/sync", params={"filter": "987654"}, headers=auth(token)
        )
    assert unknown_filter.status_code == direct.status_code != 200
    assert unknown_filter.json() == direct.json()
    assert ready.status_code == 200
    assert token not in world.daemon.log


async def test_homeserver_down_is_a_502(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    closed = f"http://127.0.0.1:{free_tcp_port()}"  # nothing listens there
    world = await front_world(synapse, nursery, tls_ca, tmp_path, spawn, homeserver_url=closed)
    async with httpx.AsyncClient(base_url=world.daemon.client, timeout=60) as http:
        answers = [
            await http.get("/_matrix/client/v3/sync", headers=auth("some-token")),
            await http.get(
                "/_matrix/client/v3/rooms/!a:b.test/messages", headers=auth("some-token")
            ),
        ]
        ready = await http.get("/ready")
        health = await http.get("/health")
    for answer in answers:
        assert answer.status_code == 502, answer.text
        assert answer.json()["errcode"] == "M_UNKNOWN"
        assert "homeserver" in answer.json()["error"]
    assert ready.status_code == 503 and "homeserver" in ready.json()["error"]
    assert health.status_code == 200


async def test_history_of_joined_rooms_goes_to_the_homeserver(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    world = await front_world(synapse, nursery, tls_ca, tmp_path, spawn)
    front = world.daemon.client
    token = synapse.register("front-history")
    joined = await create_room(synapse, token, name="Joined")
    event_id = await send_text(synapse, token, joined, "in my room", "h1")
    remote = world.create_room("10", name="Remote")
    world.send(remote, "remote message")
    await peek(world, token, remote)
    room = quote(joined, safe="")
    for path in (
        f"/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=5",
        f"/_matrix/client/r0/rooms/{room}/state",
        f"/_matrix/client/v3/rooms/{room}/event/{quote(event_id, safe='')}",
    ):
        through = await client_api(front, token, "GET", path)
        direct = await client_api(synapse.client, token, "GET", path)
        assert through.status_code == direct.status_code == 200, through.text
        assert through.headers["content-type"] == direct.headers["content-type"]
        assert without_ages(through.json()) == without_ages(direct.json())
    messages = (
        await client_api(front, token, "GET", f"/_matrix/client/v3/rooms/{room}/messages?dir=b")
    ).json()
    assert "in my room" in [e["content"].get("body") for e in messages["chunk"]]
    # The peeked room's history is peekproxy's.
    peeked = await client_api(
        front, token, "GET", f"/_matrix/client/v3/rooms/{quote(remote, safe='')}/messages?dir=b"
    )
    assert peeked.status_code == 200, peeked.text
    assert "remote message" in [e["content"].get("body") for e in peeked.json()["chunk"]]
    # A room neither joined nor peeked: the homeserver's answer (its 403), not peekproxy's.
    other = await create_room(synapse, synapse.register("front-history-2"))
    refused = await client_api(
        front, token, "GET", f"/_matrix/client/v3/rooms/{quote(other, safe='')}/messages"
    )
    direct = await client_api(
        synapse.client, token, "GET", f"/_matrix/client/v3/rooms/{quote(other, safe='')}/messages"
    )
    assert refused.status_code == direct.status_code == 403
    assert refused.json() == direct.json()


async def test_peek_sections_resume_after_peekproxy_is_killed(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    world = await front_world(synapse, nursery, tls_ca, tmp_path, spawn)
    token = synapse.register("front-restart")
    user_id = f"@front-restart:{synapse.server_name}"
    joined = await create_room(synapse, token)
    remote = world.create_room("10", name="Remote")
    world.send(remote, "one")
    first = await sync(world.daemon.client, token)
    await peek(world, token, remote)
    shown = await sync(world.daemon.client, token, since=first["next_batch"], timeout_ms=20_000)
    assert bodies(shown["rooms"]["peek"][remote]) == ["one"]
    await world.wait_delivered(world.send(remote, "two"))
    seen = await sync(world.daemon.client, token, since=shown["next_batch"], timeout_ms=20_000)
    assert bodies(seen["rooms"]["peek"][remote]) == ["two"]

    world.daemon.signal(signal.SIGKILL)
    await world.daemon.wait()
    # While peekproxy is down the client syncs at Synapse directly (the reverse proxy's
    # fallback), with the token it holds; the remote room goes on.
    await send_text(synapse, token, joined, "while away", "r1")
    direct = await sync(synapse.client, token, since=seen["next_batch"])
    assert bodies(direct["rooms"]["join"][joined]) == ["while away"]
    for body in ("three", "four", "five"):
        world.send(remote, body)
    world.daemon = await spawn(world.config, env=world.env | world.extra_env)
    # The client's filter (an ID made at Synapse) says two events per timeline.
    made = await client_api(
        synapse.client,
        token,
        "POST",
        f"/_matrix/client/v3/user/{quote(user_id, safe='')}/filter",
        {"room": {"timeline": {"limit": 2}}},
    )
    assert made.status_code == 200, made.text
    filter_id = made.json()["filter_id"]

    resumed = await sync(
        world.daemon.client, token, since=direct["next_batch"], timeout_ms=20_000, filter=filter_id
    )
    peeked = resumed["rooms"]["peek"][remote]
    assert bodies(peeked) == ["four", "five"], resumed  # the newest, cut by the filter
    assert peeked["timeline"]["limited"] is True  # gappy: "three" is before the cut
    assert joined not in resumed["rooms"].get("join", {})  # Synapse's news were seen directly


async def test_a_fault_in_the_peek_part_degrades_to_the_homeserver_answer(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    world = await front_world(synapse, nursery, tls_ca, tmp_path, spawn)
    front = world.daemon.client
    token = synapse.register("front-fault")
    joined = await create_room(synapse, token)
    remote = world.create_room("10")
    first = await sync(front, token)
    await peek(world, token, remote)
    await send_text(synapse, token, joined, "still delivered", "f1")
    # peekproxy's own part breaks: its tables of token positions and device peeks are gone.
    conn = sqlite3.connect(world.db_path)
    conn.execute("DROP TABLE front_positions")
    conn.execute("DROP TABLE device_peeks")
    conn.commit()
    conn.close()
    answer = await sync(front, token, since=first["next_batch"], timeout_ms=5_000)
    assert bodies(answer["rooms"]["join"][joined]) == ["still delivered"]
    assert "peek" not in answer["rooms"]
    await world.daemon.wait_for_log(rb"own part of a /sync failed")


async def test_the_homeserver_learns_the_client_behind_each_request(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    """Synapse keeps each device's last User-Agent and address (an admin's and a user's
    session lists), and warns on every request without X-Forwarded-Proto: what peekproxy
    passes on (whoami, /sync, a history read) carries the client's, not peekproxy's."""
    seen: list[tuple[str, dict[str, str]]] = []

    async def homeserver(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise RuntimeError("no lifespan")  # hypercorn then runs without one
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        seen.append((scope["path"], headers))
        body: dict[str, Any]
        if scope["path"].endswith("/account/whoami"):
            body = {"user_id": "@ua:hs.test", "device_id": "UADEVICE"}
        elif scope["path"].endswith("/sync"):
            body = {"next_batch": "s1"}
        else:
            body = {"chunk": []}
        raw = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": raw})

    url = await serve_app(nursery, homeserver)
    world = await front_world(synapse, nursery, tls_ca, tmp_path, spawn, homeserver_url=url)
    client = {
        "Authorization": "Bearer ua-token",
        "User-Agent": "Element/1.11 (test)",
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https",
    }
    async with httpx.AsyncClient(base_url=world.daemon.client, timeout=60) as http:
        synced = await http.get("/_matrix/client/v3/sync", headers=client)
        read = await http.get("/_matrix/client/v3/rooms/!r:hs.test/messages", headers=client)
    assert synced.status_code == read.status_code == 200, (synced.text, read.text)
    assert f"front={url} (without its own rooms)" in world.daemon.log  # the ready line
    paths = {path.rsplit("/", 1)[-1] for path, _ in seen}
    assert {"whoami", "sync", "messages"} <= paths
    for path, headers in seen:
        assert headers["user-agent"] == "Element/1.11 (test)", path
        assert headers["x-forwarded-proto"] == "https", path
        assert headers["x-forwarded-for"].startswith("203.0.113.7, "), path

"""Front mode: world_readable rooms hosted on the fronted homeserver itself (a real Synapse,
which has no MSC2444) are followed through its client API as peekproxy's own local account
(``upstream.access_token_file``), and show in ``rooms.peek`` like remote ones."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio
import trustme

from tests import front_support
from tests.conftest import Spawn
from tests.front_support import Account
from tests.peek_world import PeekWorld
from tests.synapse import Synapse


async def front_world(
    synapse: Synapse,
    nursery: trio.Nursery,
    tls_ca: trustme.CA,
    tmp_path: Path,
    spawn: Spawn,
    reader: Account,
) -> PeekWorld:
    return await front_support.front_world(synapse, nursery, tls_ca, tmp_path, spawn, reader=reader)


async def peek(world: PeekWorld, who: Account, room_id: str, **params: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=world.daemon.client, timeout=60) as http:
        return await http.post(
            f"/_matrix/client/v3/peek/{quote(room_id, safe='')}",
            params=params,
            json={},
            headers=who.auth,
        )


def bodies(room: dict[str, Any]) -> list[str]:
    return [e["content"].get("body") for e in room["timeline"]["events"] if "body" in e["content"]]


async def sync_until(
    world: PeekWorld, who: Account, since: str | None, wanted: Any, deadline_s: float = 30.0
) -> tuple[dict[str, Any], str]:
    """Long-poll ``who``'s device until ``wanted(sync)`` holds (or fail at the deadline);
    returns that sync and its ``next_batch``."""
    with trio.fail_after(deadline_s):
        while True:
            synced = await world.sync(
                user=who.user_id, device=who.device_id, since=since, timeout_ms=5000
            )
            if wanted(synced):
                return synced, synced["next_batch"]
            since = synced["next_batch"]


async def test_local_world_readable_room_peeked_live_through_the_client_api(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    alice, bob, reader = (Account(synapse, f"lr-{n}") for n in ("alice", "bob", "reader"))
    room_id = await alice.create_room(version="10")
    for body in ("one", "two", "three"):
        await alice.send(room_id, body)
    closed = await alice.create_room(version="10", world_readable=False)
    world = await front_world(synapse, nursery, tls_ca, tmp_path, spawn, reader)

    # bob never joined: his peek of the local room is followed through the client API.
    response = await peek(world, bob, room_id)
    assert response.status_code == 200, response.text
    synced, since = await sync_until(world, bob, None, lambda s: room_id in s["rooms"]["peek"])
    room = synced["rooms"]["peek"][room_id]
    shown = room["state"]["events"] + room["timeline"]["events"]
    names = [e for e in shown if e["type"] == "m.room.name"]
    assert names and names[0]["content"] == {"name": "Local room"}
    assert bodies(room)[-3:] == ["one", "two", "three"]

    # Live: alice's next message reaches bob's long-poll.
    sent_at = time.monotonic()
    live_id = await alice.send(room_id, "live")
    synced, since = await sync_until(
        world, bob, since, lambda s: "live" in bodies(s["rooms"]["peek"].get(room_id, _EMPTY))
    )
    wake_ms = (time.monotonic() - sent_at) * 1000
    assert [e["event_id"] for e in synced["rooms"]["peek"][room_id]["timeline"]["events"]] == [
        live_id
    ]
    print(f"send on Synapse -> bob's peek sync: {wake_ms:.0f} ms")

    # A local room that is not world_readable is not peekable.
    refused = await peek(world, bob, closed)
    assert refused.status_code == 403, refused.text
    assert refused.json()["errcode"] == "M_FORBIDDEN"

    # History past the first view ends cleanly (no federation backfill for this room).
    async with httpx.AsyncClient(base_url=world.daemon.client, timeout=60) as http:
        token: str | None = None
        seen: list[str] = []
        for _ in range(20):
            params = {"dir": "b", "limit": "5"} | ({"from": token} if token else {})
            page = await http.get(
                f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/messages",
                params=params,
                headers=bob.auth,
            )
            assert page.status_code == 200, page.text
            seen += [e["content"].get("body") for e in page.json()["chunk"]]
            token = page.json().get("end")
            if token is None:
                break
        assert token is None
    assert [b for b in seen if b][:4] == ["live", "three", "two", "one"]

    # A restart: the peek resumes, with a gap, and the events sent meanwhile arrive.
    world.daemon.signal()
    await world.daemon.wait()
    await alice.send(room_id, "while down")
    world.daemon = await spawn(world.config, env=world.env)
    await alice.send(room_id, "after restart")
    synced, since = await sync_until(
        world,
        bob,
        since,
        lambda s: "after restart" in bodies(s["rooms"]["peek"].get(room_id, _EMPTY)),
    )
    timeline = synced["rooms"]["peek"][room_id]["timeline"]
    assert timeline["limited"] is True
    assert bodies(synced["rooms"]["peek"][room_id])[-2:] == ["while down", "after restart"]

    # The room stops being world_readable: the peek ends (rooms.leave).
    await alice.set_state(room_id, "m.room.history_visibility", {"history_visibility": "shared"})
    synced, since = await sync_until(world, bob, since, lambda s: room_id in s["rooms"]["leave"])
    assert room_id not in synced["rooms"]["peek"]
    for token_ in (bob.token, reader.token):
        assert token_ not in world.daemon.log


_EMPTY: dict[str, Any] = {"timeline": {"events": []}}


async def test_local_room_v12_named_by_server_name(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    """A room version 12 ID has no server part: the peek names the homeserver. Enabling
    encryption ends the peek."""
    alice, bob, reader = (Account(synapse, f"lr12-{n}") for n in ("alice", "bob", "reader"))
    room_id = await alice.create_room(version="12")
    await alice.send(room_id, "first")
    world = await front_world(synapse, nursery, tls_ca, tmp_path, spawn, reader)
    response = await peek(world, bob, room_id, server_name=synapse.server_name)
    assert response.status_code == 200, response.text
    synced, since = await sync_until(world, bob, None, lambda s: room_id in s["rooms"]["peek"])
    room = synced["rooms"]["peek"][room_id]
    creates = [e for e in room["state"]["events"] if e["type"] == "m.room.create"]
    assert creates and creates[0]["content"]["room_version"] == "12"
    assert bodies(room)[-1:] == ["first"]
    await alice.send(room_id, "second")
    _, since = await sync_until(
        world, bob, since, lambda s: "second" in bodies(s["rooms"]["peek"].get(room_id, _EMPTY))
    )
    # Encryption enabled (Synapse still lets non-members read the room): the peek ends.
    await alice.set_state(room_id, "m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"})
    await sync_until(world, bob, since, lambda s: room_id in s["rooms"]["leave"])


async def test_a_room_the_homeserver_is_not_in_is_peeked_through_the_other_candidates(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    """The homeserver named first but not in the room (a testbed room): the client API
    cannot read it, so the next candidate is peeked over federation (MSC2444)."""
    bob, reader = Account(synapse, "lrx-bob"), Account(synapse, "lrx-reader")
    world = await front_world(synapse, nursery, tls_ca, tmp_path, spawn, reader)
    room_id = world.create_room("10", name="Remote")
    world.send(room_id, "remote hello")
    response = await peek(world, bob, room_id, server_name=synapse.server_name)
    assert response.status_code == 200, response.text
    synced, _ = await sync_until(world, bob, None, lambda s: room_id in s["rooms"]["peek"])
    assert "remote hello" in bodies(synced["rooms"]["peek"][room_id])
    assert len(world.log_of("start")) == 1  # followed by an MSC2444 peek at the testbed
    # A local room the reader cannot see and no other candidate: a clear 502, not a 500.
    private = await bob.call("POST", "/createRoom", {"preset": "private_chat"})
    refused = await peek(world, Account(synapse, "lrx-carol"), private["room_id"])
    assert refused.status_code == 502, refused.text
    assert "not in the room" in refused.json()["error"]


async def test_a_local_alias_is_resolved_through_the_client_api(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    """The homeserver's own aliases need no federation (which would need the homeserver to
    reach peekproxy's own server name): they are looked up in its client API directory."""
    alice, bob, reader = (Account(synapse, f"la-{n}") for n in ("alice", "bob", "reader"))
    room_id = await alice.create_room(version="10")
    await alice.send(room_id, "by alias")
    alias = f"#la-{time.monotonic_ns()}:{synapse.server_name}"
    await alice.call("PUT", f"/directory/room/{quote(alias, safe='')}", {"room_id": room_id})
    world = await front_world(synapse, nursery, tls_ca, tmp_path, spawn, reader)
    async with httpx.AsyncClient(base_url=world.daemon.client, timeout=60) as http:
        by_alias = await http.post(
            "/_matrix/client/v3/peek_room", json={"room": alias}, headers=bob.auth
        )
        unknown = await http.post(
            "/_matrix/client/v3/peek_room",
            json={"room": f"#nobody-{time.monotonic_ns()}:{synapse.server_name}"},
            headers=bob.auth,
        )
    assert by_alias.status_code == 200, by_alias.text
    assert by_alias.json()["room_id"] == room_id
    assert unknown.status_code == 404 and unknown.json()["errcode"] == "M_NOT_FOUND"
    synced, _ = await sync_until(world, bob, None, lambda s: room_id in s["rooms"]["peek"])
    assert "by alias" in bodies(synced["rooms"]["peek"][room_id])

"""The observer join as a follower, end to end against a real Synapse over TLS federation:
join, live events, linger and leave, a room that may not be peeked."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio

from tests.conftest import Spawn
from tests.front_support import Account
from tests.peek_world import SECRET
from tests.support import DaemonProcess, write_config
from tests.synapse import Synapse, free_tcp_port


async def _observer_peekproxy(
    server_dir: Path, tls_files: tuple[Path, Path, Path], spawn: Spawn, **peeks: str
) -> tuple[DaemonProcess, str]:
    cert, key, ca = tls_files
    port = free_tcp_port()
    (server_dir / "delegation.secret").write_text(SECRET + "\n")
    config = write_config(
        server_dir,
        server_name=f"localhost:{port}",
        binds={"federation": f"127.0.0.1:{port}"},
        extra={
            "listeners.federation": f'tls_certificate_file = "{cert}"\n'
            f'tls_private_key_file = "{key}"',
            "delegation": 'shared_secret_file = "delegation.secret"',
        },
    )
    env = {
        "PEEKPROXY_FEDERATION__IP_RANGE_WHITELIST": '["127.0.0.0/8", "::1/128"]',
        "PEEKPROXY_FEDERATION__TLS_CA_FILE": str(ca),
        "PEEKPROXY_PEEKS__FALLBACK": "observer_join",
    } | {f"PEEKPROXY_PEEKS__{k.upper()}": v for k, v in peeks.items()}
    return await spawn(config, env=env), f"localhost:{port}"


async def _call(daemon: DaemonProcess, method: str, path: str, **kw: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as http:
        return await http.request(
            method,
            f"{daemon.client}/_peekproxy/v1{path}",
            headers={"Authorization": f"Bearer {SECRET}"},
            **kw,
        )


async def _members(account: Account, room_id: str) -> dict[str, str]:
    body = await account.call("GET", f"/rooms/{quote(room_id)}/members")
    return {e["state_key"]: e["content"]["membership"] for e in body["chunk"]}


async def test_observer_joins_follows_and_leaves(
    synapse: Synapse, server_dir: Path, tls_files: tuple[Path, Path, Path], spawn: Spawn
) -> None:
    alice = Account(synapse, "obs_alice")
    room_id = await alice.create_room(version="10")
    await alice.send(room_id, "before the peek")
    daemon, name = await _observer_peekproxy(
        server_dir, tls_files, spawn, idle_timeout="1s", observer_linger="1s"
    )
    observer = f"@peekproxy:{name}"
    who = {"user_id": "@dev:example.org", "device_id": "D1"}
    server = synapse.server_name
    answer = await _call(
        daemon, "POST", f"/peek/{quote(room_id)}", params=who | {"server_name": server}, json={}
    )
    assert answer.status_code == 200, answer.text
    assert (await _members(alice, room_id)).get(observer) == "join"
    assert "fallback=observer_join" in daemon.log  # the ready line
    body = (await _call(daemon, "GET", "/sync", params=who | {"timeout": "0"})).json()
    room = body["rooms"]["peek"][room_id]
    texts = [e["content"].get("body") for e in room["timeline"]["events"]]
    assert "before the peek" in texts
    since = body["next_batch"]
    await alice.send(room_id, "live")
    with trio.fail_after(5):
        while True:
            body = (
                await _call(
                    daemon, "GET", "/sync", params=who | {"timeout": "3000", "since": since}
                )
            ).json()
            since = body["next_batch"]
            events = body.get("rooms", {}).get("peek", {}).get(room_id, {}).get("timeline", {})
            if any(e["content"].get("body") == "live" for e in events.get("events", [])):
                break
    # Idle: the device stops syncing → its peek is dormant → the observer leaves after 1 s.
    with trio.fail_after(20):
        while True:  # polled: the leave is on Synapse
            if (await _members(alice, room_id)).get(observer) == "leave":
                break
            await trio.sleep(0.3)


async def test_a_room_that_may_not_be_peeked_is_never_joined(
    synapse: Synapse, server_dir: Path, tls_files: tuple[Path, Path, Path], spawn: Spawn
) -> None:
    alice = Account(synapse, "obs_private")
    shared = await alice.create_room(version="10", world_readable=False)
    encrypted = await alice.create_room(version="10")
    await alice.call(
        "PUT",
        f"/rooms/{quote(encrypted)}/state/m.room.encryption/",
        {"algorithm": "m.megolm.v1.aes-sha2"},
    )
    daemon, name = await _observer_peekproxy(server_dir, tls_files, spawn)
    who = {"user_id": "@dev:example.org", "device_id": "D1", "server_name": synapse.server_name}
    for room_id, why in ((shared, "not world_readable"), (encrypted, "encrypted")):
        answer = await _call(daemon, "POST", f"/peek/{quote(room_id)}", params=who, json={})
        assert answer.status_code == 403, answer.text
        assert answer.json()["errcode"] == "M_FORBIDDEN"
        assert why in answer.json()["error"]
        assert f"@peekproxy:{name}" not in await _members(alice, room_id)


async def test_a_kick_of_the_observer_ends_the_peek(
    synapse: Synapse, server_dir: Path, tls_files: tuple[Path, Path, Path], spawn: Spawn
) -> None:
    alice = Account(synapse, "obs_kicker")
    room_id = await alice.create_room(version="11")
    daemon, name = await _observer_peekproxy(server_dir, tls_files, spawn)
    who = {"user_id": "@dev:example.org", "device_id": "D1"}
    answer = await _call(
        daemon,
        "POST",
        f"/peek/{quote(room_id)}",
        params=who | {"server_name": synapse.server_name},
        json={},
    )
    assert answer.status_code == 200, answer.text
    since = (await _call(daemon, "GET", "/sync", params=who | {"timeout": "0"})).json()[
        "next_batch"
    ]
    await alice.call(
        "POST", f"/rooms/{quote(room_id)}/kick", {"user_id": f"@peekproxy:{name}", "reason": "no"}
    )
    with trio.fail_after(10):
        while True:
            body = (
                await _call(
                    daemon, "GET", "/sync", params=who | {"timeout": "3000", "since": since}
                )
            ).json()
            since = body["next_batch"]
            if room_id in body.get("rooms", {}).get("leave", {}):
                break
    # The peek ended: the observer does not join again by itself.
    await trio.sleep(1)
    assert (await _members(alice, room_id))[f"@peekproxy:{name}"] == "leave"

"""Helpers of the front-mode end-to-end tests: a peekproxy fronting the session's real
Synapse (with the testbed as a remote room host), accounts of that Synapse, and raw
client-API calls."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio
import trustme

from tests.conftest import Spawn
from tests.peek_world import TESTBED, PeekWorld, build_world
from tests.synapse import Synapse


async def front_world(
    synapse: Synapse | None,
    nursery: trio.Nursery,
    tls_ca: trustme.CA,
    tmp_path: Path,
    spawn: Spawn,
    *,
    homeserver_url: str | None = None,
    reader: Account | None = None,
    env: dict[str, str] | None = None,
) -> PeekWorld:
    """The testbed + peekproxy world with peekproxy in front mode before ``homeserver_url``
    (default: the session's Synapse; ``synapse`` may then be ``None``). With ``reader``,
    peekproxy reads the homeserver's own world_readable rooms as that account
    (``upstream.access_token_file``); ``env``: more ``PEEKPROXY_*`` settings."""
    if homeserver_url is None:
        assert synapse is not None
        homeserver_url = synapse.client
    peeks_env = {"PEEKPROXY_UPSTREAM__HOMESERVER_URL": homeserver_url}
    if reader is not None:
        token_file = tmp_path / "reader.token"
        token_file.write_text(reader.token + "\n")
        peeks_env["PEEKPROXY_UPSTREAM__ACCESS_TOKEN_FILE"] = str(token_file)
    return await build_world(nursery, tls_ca, tmp_path, spawn, peeks_env=peeks_env | (env or {}))


WORLD_READABLE = {
    "type": "m.room.history_visibility",
    "state_key": "",
    "content": {"history_visibility": "world_readable"},
}


class Account:
    """A user of the real Synapse: its access token, user ID and device ID."""

    def __init__(self, synapse: Synapse, name: str) -> None:
        self.synapse = synapse
        self.token = synapse.register(name)
        me = httpx.get(
            f"{synapse.client}/_matrix/client/v3/account/whoami", headers=self.auth, timeout=30
        ).json()
        self.user_id: str = me["user_id"]
        self.device_id: str = me["device_id"]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with httpx.AsyncClient(base_url=self.synapse.client, timeout=30) as http:
            response = await http.request(
                method, f"/_matrix/client/v3{path}", json=body, headers=self.auth
            )
        assert response.status_code == 200, response.text
        return response.json()

    async def create_room(self, *, version: str, world_readable: bool = True) -> str:
        answer = await self.call(
            "POST",
            "/createRoom",
            {
                "preset": "public_chat",
                "room_version": version,
                "name": "Local room",
                "initial_state": [WORLD_READABLE] if world_readable else [],
            },
        )
        room_id: str = answer["room_id"]
        return room_id

    async def send(self, room_id: str, body: str) -> str:
        answer = await self.call(
            "PUT",
            f"/rooms/{quote(room_id, safe='')}/send/m.room.message/{time.monotonic_ns()}",
            {"msgtype": "m.text", "body": body},
        )
        event_id: str = answer["event_id"]
        return event_id

    async def set_state(self, room_id: str, kind: str, content: dict[str, Any]) -> None:
        await self.call("PUT", f"/rooms/{quote(room_id, safe='')}/state/{kind}/", content)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def sync(
    base: str,
    token: str,
    *,
    since: str | None = None,
    timeout_ms: int = 0,
    **params: str,
) -> dict[str, Any]:
    """One ``GET /_matrix/client/v3/sync`` at ``base``; asserts 200."""
    query = {"timeout": str(timeout_ms), **params}
    if since is not None:
        query["since"] = since
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        response = await http.get("/_matrix/client/v3/sync", params=query, headers=auth(token))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def client_api(
    base: str, token: str, method: str, path: str, body: Any = None
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        return await http.request(method, path, json=body, headers=auth(token))


async def peek(world: PeekWorld, token: str, room_id: str) -> None:
    """The token's device peeks the testbed room through the MSC2753 client path."""
    response = await client_api(
        world.daemon.client,
        token,
        "POST",
        f"/_matrix/client/v3/peek/{quote(room_id, safe='')}?server_name={TESTBED}",
        {},
    )
    assert response.status_code == 200, response.text


async def create_room(synapse: Synapse, token: str, **body: Any) -> str:
    response = await client_api(
        synapse.client, token, "POST", "/_matrix/client/v3/createRoom", body
    )
    assert response.status_code == 200, response.text
    room_id: str = response.json()["room_id"]
    return room_id


async def send_text(synapse: Synapse, token: str, room_id: str, body: str, txn: str) -> str:
    response = await client_api(
        synapse.client,
        token,
        "PUT",
        f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/send/m.room.message/{txn}",
        {"msgtype": "m.text", "body": body},
    )
    assert response.status_code == 200, response.text
    event_id: str = response.json()["event_id"]
    return event_id


def bodies(room: dict[str, Any]) -> list[str]:
    """The message bodies of a sync room entry's timeline, in order."""
    return [
        e["content"].get("body", "")
        for e in room.get("timeline", {}).get("events", [])
        if e.get("type") == "m.room.message"
    ]


def without_ages(value: Any) -> Any:
    """A JSON value without its ``age`` fields (they move on between two requests)."""
    if isinstance(value, dict):
        return {k: without_ages(v) for k, v in value.items() if k != "age"}
    if isinstance(value, list):
        return [without_ages(v) for v in value]
    return value

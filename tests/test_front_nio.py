"""A real client (matrix-nio) syncing through the front sees what it sees at Synapse.

nio runs on asyncio: the session runs in a worker thread with its own event loop. One
user, two devices: FRONT syncs through peekproxy, DIRECT at Synapse; a scripted session
(a room, messages, a state change, account data, to-device from a third device) must look
the same to both (joined rooms, timelines, room name, account data, to-device messages)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import nio
import trio
import trustme

from tests.conftest import Spawn
from tests.front_support import auth, front_world
from tests.synapse import Synapse

PASSWORD = "interop-password"  # tests/synapse.py registers every user with it


def _login(synapse: Synapse, user: str, device: str) -> str:
    response = httpx.post(
        f"{synapse.client}/_matrix/client/v3/login",
        json={
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": PASSWORD,
            "device_id": device,
        },
        timeout=30,
    )
    response.raise_for_status()
    token: str = response.json()["access_token"]
    return token


class Seen:
    """What one nio client saw over its syncs."""

    def __init__(self) -> None:
        self.timelines: dict[str, list[str]] = {}
        self.account_data: list[tuple[str, Any]] = []
        self.to_device: list[tuple[str, Any]] = []

    def take(self, response: nio.SyncResponse) -> None:
        for room_id, room in response.rooms.join.items():
            ids = self.timelines.setdefault(room_id, [])
            ids += [event.event_id for event in room.timeline.events]
        for event in response.account_data_events:
            # nio parses the types it knows (push rules), keeps type + content of others.
            kind = getattr(event, "type", type(event).__name__)
            self.account_data.append((kind, getattr(event, "content", None)))
        for event in response.to_device_events:
            self.to_device.append((event.source["type"], event.source["content"]))


async def _session(front_url: str, synapse_url: str, user: str, tokens: dict[str, str]) -> Any:
    front = nio.AsyncClient(front_url, user)
    front.restore_login(user, "FRONT", tokens["FRONT"])
    direct = nio.AsyncClient(synapse_url, user)
    direct.restore_login(user, "DIRECT", tokens["DIRECT"])
    sender = nio.AsyncClient(synapse_url, user)
    sender.restore_login(user, "SENDER", tokens["SENDER"])
    seen = {"FRONT": Seen(), "DIRECT": Seen()}

    async def sync_both(timeout: int = 0) -> None:
        for name, client in (("FRONT", front), ("DIRECT", direct)):
            response = await client.sync(timeout=timeout)
            assert isinstance(response, nio.SyncResponse), (name, response)
            seen[name].take(response)

    try:
        await sync_both()
        created = await direct.room_create(name="Session")
        assert isinstance(created, nio.RoomCreateResponse), created
        room_id = created.room_id
        await sync_both()
        for n in range(3):
            sent = await direct.room_send(
                room_id, "m.room.message", {"msgtype": "m.text", "body": f"message {n}"}
            )
            assert isinstance(sent, nio.RoomSendResponse), sent
        await sync_both()
        renamed = await direct.room_put_state(room_id, "m.room.name", {"name": "Renamed"})
        assert isinstance(renamed, nio.RoomPutStateResponse), renamed
        async with httpx.AsyncClient(base_url=synapse_url) as http:
            put = await http.put(
                f"/_matrix/client/v3/user/{quote(user, safe='')}/account_data/org.example.test",
                json={"set": "in the session"},
                headers=auth(tokens["DIRECT"]),
            )
            assert put.status_code == 200, put.text
        for device in ("FRONT", "DIRECT"):
            message = nio.ToDeviceMessage("org.example.ping", user, device, {"hello": 1})
            answer = await sender.to_device(message)
            assert isinstance(answer, nio.ToDeviceResponse), answer
        await sync_both()
        await sync_both(timeout=500)  # anything still on its way
        names = {
            name: client.rooms[room_id].name if room_id in client.rooms else None
            for name, client in (("FRONT", front), ("DIRECT", direct))
        }
        joined = {
            name: sorted(client.rooms) for name, client in (("FRONT", front), ("DIRECT", direct))
        }
        return room_id, seen, names, joined
    finally:
        for client in (front, direct, sender):
            await client.close()


async def test_nio_through_the_front_equals_a_direct_sync(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    world = await front_world(synapse, nursery, tls_ca, tmp_path, spawn)
    synapse.register("front-nio")
    user = f"@front-nio:{synapse.server_name}"
    tokens = {
        device: _login(synapse, "front-nio", device) for device in ("FRONT", "DIRECT", "SENDER")
    }
    room_id, seen, names, joined = await trio.to_thread.run_sync(
        lambda: asyncio.run(_session(world.daemon.client, synapse.client, user, tokens))
    )
    front, direct = seen["FRONT"], seen["DIRECT"]
    assert joined["FRONT"] == joined["DIRECT"] == [room_id]
    assert names["FRONT"] == names["DIRECT"] == "Renamed"
    assert front.timelines == direct.timelines
    assert len(front.timelines[room_id]) >= 8  # creation, 3 messages, the new name
    assert front.account_data == direct.account_data
    assert ("org.example.test", {"set": "in the session"}) in front.account_data
    assert front.to_device == direct.to_device == [("org.example.ping", {"hello": 1})]
    for token in tokens.values():
        assert token not in world.daemon.log

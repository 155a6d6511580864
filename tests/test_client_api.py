"""Front mode: the MSC2753 client endpoints on r0, v3 and the unstable prefix, with access
tokens checked by a real Synapse (``upstream.homeserver_url``)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import trio
import trustme

from tests.conftest import Spawn
from tests.peek_world import TESTBED, build_world
from tests.synapse import Synapse

PREFIXES = [
    "/_matrix/client/v3",
    "/_matrix/client/r0",
    "/_matrix/client/unstable/org.matrix.msc2753",
]


async def test_client_endpoints_with_homeserver_tokens(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    world = await build_world(
        nursery,
        tls_ca,
        tmp_path,
        spawn,
        peeks_env={"PEEKPROXY_UPSTREAM__HOMESERVER_URL": synapse.client},
    )
    token = synapse.register("front-user")
    async with httpx.AsyncClient(base_url=synapse.client) as http:
        me = (
            await http.get(
                "/_matrix/client/v3/account/whoami", headers={"Authorization": f"Bearer {token}"}
            )
        ).json()
    room_id = world.create_room("10", name="Front")
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=world.daemon.client, timeout=60) as http:
        for prefix in PREFIXES:  # the same on every prefix; re-peeking is idempotent
            response = await http.post(
                f"{prefix}/peek/{quote(room_id, safe='')}",
                params={"server_name": TESTBED},
                json={},
                headers=auth,
            )
            assert response.status_code == 200, response.text
            assert response.json() == {"room_id": room_id}
        via_body = await http.post(
            "/_matrix/client/v3/peek_room",
            headers=auth,
            json={"room": room_id, "servers": [TESTBED]},
        )
        assert via_body.status_code == 200 and via_body.json()["room_id"] == room_id
        assert via_body.json()["peek_expiry_ts"] > 0
        by_query = await http.post(
            f"/_matrix/client/v3/peek/{quote(room_id, safe='')}",
            params={"access_token": token},
            json={},
        )
        assert by_query.status_code == 200
        missing = await http.post(f"/_matrix/client/v3/peek/{quote(room_id, safe='')}", json={})
        unknown = await http.post(
            f"/_matrix/client/v3/peek/{quote(room_id, safe='')}",
            json={},
            headers={"Authorization": "Bearer nonsense"},
        )
        state = await http.get(
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/state", headers=auth
        )
        assert state.status_code == 200
        assert any(e["type"] == "m.room.name" for e in state.json())
        # The peek belongs to the token's device, as the homeserver knows it.
        synced = await world.sync(user=me["user_id"], device=me["device_id"])
        assert room_id in synced["rooms"]["peek"]
        other = await world.sync(user=me["user_id"], device="ANOTHER")
        assert room_id not in other["rooms"]["peek"]
        left = await http.post(
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/unpeek", json={}, headers=auth
        )
        assert left.status_code == 200 and left.json() == {}
    assert missing.status_code == 401 and missing.json()["errcode"] == "M_MISSING_TOKEN"
    assert unknown.status_code == 401 and unknown.json()["errcode"] == "M_UNKNOWN_TOKEN"
    assert len(world.log_of("start")) == 1  # one subscription for all of it
    assert token not in world.daemon.log  # tokens are never logged


@pytest.mark.slow
async def test_client_endpoints_refuse_bad_server_hints(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    """Front mode runs the same handlers: a hint that is not a server name is a 400 on every
    client prefix, before any lookup (issue 10 item 16)."""
    world = await build_world(
        nursery,
        tls_ca,
        tmp_path,
        spawn,
        peeks_env={"PEEKPROXY_UPSTREAM__HOMESERVER_URL": synapse.client},
    )
    token = synapse.register("hint-user")
    room_id = world.create_room("10")
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=world.daemon.client, timeout=60) as http:
        for prefix in PREFIXES:
            responses = [
                await http.post(
                    f"{prefix}/peek/{quote(room_id, safe='')}",
                    params=[("server_name", TESTBED), ("server_name", "not a server")],
                    json={},
                    headers=auth,
                ),
                await http.post(
                    f"{prefix}/peek_room",
                    json={"room": room_id, "servers": [TESTBED, "x.test/path"]},
                    headers=auth,
                ),
            ]
            for response in responses:
                assert response.status_code == 400, response.text
                assert response.json()["errcode"] == "M_INVALID_PARAM"
                assert "server hint" in response.json()["error"]
    assert world.log_of("start") == []

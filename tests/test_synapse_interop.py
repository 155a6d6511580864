"""Interop with a real Synapse over TLS federation, both directions."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import httpx

from peekproxy.config import load_config
from peekproxy.federation.client import FederationClient
from peekproxy.federation.signing_key import load_signing_key
from tests.conftest import Spawn
from tests.support import DaemonProcess, write_config
from tests.synapse import Synapse, free_tcp_port

LOOPBACK = '["127.0.0.0/8", "::1/128"]'


async def _peekproxy(
    server_dir: Path, tls_files: tuple[Path, Path, Path], spawn: Spawn
) -> tuple[DaemonProcess, Path, dict[str, str]]:
    cert, key, ca = tls_files
    port = free_tcp_port()
    config = write_config(
        server_dir,
        server_name=f"localhost:{port}",
        binds={"federation": f"127.0.0.1:{port}"},
        extra={
            "listeners.federation": f'tls_certificate_file = "{cert}"\n'
            f'tls_private_key_file = "{key}"'
        },
    )
    env = {
        "PEEKPROXY_FEDERATION__IP_RANGE_WHITELIST": LOOPBACK,
        "PEEKPROXY_FEDERATION__TLS_CA_FILE": str(ca),
    }
    return await spawn(config, env=env), config, env


async def _create_room_with_alias(synapse: Synapse, user: str, alias_local: str) -> str:
    token = synapse.register(user)
    async with httpx.AsyncClient(base_url=synapse.client, timeout=30) as http:
        response = await http.post(
            "/_matrix/client/v3/createRoom",
            headers={"Authorization": f"Bearer {token}"},
            json={"room_alias_name": alias_local, "preset": "public_chat"},
        )
    response.raise_for_status()
    room_id: str = response.json()["room_id"]
    return room_id


async def test_synapse_accepts_a_request_signed_by_peekproxy(
    synapse: Synapse, server_dir: Path, tls_files: tuple[Path, Path, Path], spawn: Spawn
) -> None:
    room_id = await _create_room_with_alias(synapse, "alice", "interop")
    daemon, config_path, env = await _peekproxy(server_dir, tls_files, spawn)
    config = load_config(config_path, env)
    client = FederationClient.from_config(
        config.federation,
        server_name=config.server.server_name,
        signing_key=load_signing_key(config.server.signing_key_file),
    )
    try:
        answer = await client.get_json(
            synapse.server_name,
            "/_matrix/federation/v1/query/directory",
            query={"room_alias": f"#interop:{synapse.server_name}"},
        )
    finally:
        await client.aclose()
    # Synapse fetched peekproxy's key over TLS, checked the X-Matrix signature and answered.
    assert answer["room_id"] == room_id
    assert synapse.server_name in answer["servers"]
    assert daemon.process.returncode is None


async def test_peekproxy_verifies_a_request_signed_by_synapse(
    synapse: Synapse, server_dir: Path, tls_files: tuple[Path, Path, Path], spawn: Spawn
) -> None:
    token = synapse.register("bob")
    daemon, config_path, _ = await _peekproxy(server_dir, tls_files, spawn)
    our_name = load_config(config_path, {}).server.server_name
    alias = f"#anything:{our_name}"
    async with httpx.AsyncClient(base_url=synapse.client, timeout=60) as http:
        response = await http.get(
            f"/_matrix/client/v3/directory/room/{quote(alias, safe='')}",
            headers={"Authorization": f"Bearer {token}"},
        )
    # Synapse asked peekproxy over federation; peekproxy verified Synapse's signature
    # (fetching Synapse's key over TLS) and answered that it hosts no such alias.
    assert response.status_code == 404, response.text
    assert response.json()["errcode"] == "M_NOT_FOUND"
    await daemon.wait_for_log(
        rf"directory query from {synapse.server_name} for {alias}: not found".encode()
    )

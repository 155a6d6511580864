"""Inbound X-Matrix on the real daemon: origin key fetched over TLS, every failure a 401."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import trio
from signedjson.key import generate_signing_key

from peekproxy.core.xmatrix import authorization_header
from peekproxy.federation.signing_key import server_key_document
from tests.conftest import Spawn
from tests.support import JsonApp, serve_app, write_config

OUR_NAME = "localhost:8448"
TARGET = "/_matrix/federation/v1/query/directory?room_alias=%23nothing%3Alocalhost%3A8448"


async def test_inbound_requests_are_verified(
    nursery: trio.Nursery, server_dir: Path, tls_files: tuple[Path, Path, Path], spawn: Spawn
) -> None:
    cert, key, ca = tls_files
    origin_key = generate_signing_key("o1")
    names: dict[str, str] = {}

    async def key_document(scope: Any, body: bytes) -> tuple[int, Any]:
        return 200, server_key_document(
            names["origin"], origin_key, now_ms=int(time.time() * 1000), valid_for_ms=3_600_000
        )

    url = await serve_app(
        nursery, JsonApp({("GET", "/_matrix/key/v2/server"): key_document}), tls=(cert, key)
    )
    origin = names["origin"] = f"localhost:{url.rsplit(':', 1)[1]}"
    daemon = await spawn(
        write_config(server_dir, server_name=OUR_NAME),
        env={
            "PEEKPROXY_FEDERATION__IP_RANGE_WHITELIST": '["127.0.0.0/8", "::1/128"]',
            "PEEKPROXY_FEDERATION__TLS_CA_FILE": str(ca),
        },
    )

    def signed(
        target: str = TARGET,
        *,
        destination: str = OUR_NAME,
        origin: str = origin,
        signer: Any = origin_key,
    ) -> dict[str, str]:
        return {
            "Authorization": authorization_header(
                signer, origin=origin, destination=destination, method="GET", uri=target
            )
        }

    async with httpx.AsyncClient(base_url=daemon.federation, timeout=20) as http:
        good = await http.get(TARGET, headers=signed())
        missing = await http.get(TARGET)
        wrong_destination = await http.get(TARGET, headers=signed(destination="other.test"))
        forged = await http.get(TARGET, headers=signed(signer=generate_signing_key("o1")))
        tampered = await http.get(TARGET.replace("nothing", "else"), headers=signed())
        unknown_origin = await http.get(TARGET, headers=signed(origin="localhost:1"))
        malformed = await http.get(TARGET, headers={"Authorization": "X-Matrix origin=oops"})
        many = await http.get(
            TARGET,
            headers=[
                ("Authorization", signed(origin=f"o{i}.test")["Authorization"]) for i in range(4)
            ],
        )
        bad_alias = await http.get(
            "/_matrix/federation/v1/query/directory?room_alias=nope",
            headers=signed("/_matrix/federation/v1/query/directory?room_alias=nope"),
        )

    assert good.status_code == 404 and good.json()["errcode"] == "M_NOT_FOUND"
    assert bad_alias.status_code == 400 and bad_alias.json()["errcode"] == "M_INVALID_PARAM"
    for response, reason in [
        (missing, "Missing X-Matrix"),
        (wrong_destination, "destination 'other.test'"),
        (forged, "invalid X-Matrix signature"),
        (tampered, "invalid X-Matrix signature"),
        (unknown_origin, "cannot get keys of localhost:1"),
        (malformed, "lacks key, sig"),
        (many, "more than 3 X-Matrix headers"),
    ]:
        assert response.status_code == 401, (reason, response.text)
        assert response.json()["errcode"] == "M_UNAUTHORIZED"
        assert reason in response.json()["error"], response.json()
    assert "directory query from " + origin in daemon.log

"""A federation server in the test process: publishes its key over TLS, records the
``/send`` transactions it receives, and sends signed requests as itself."""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path
from typing import Any

import trio
import trustme
from signedjson.key import generate_signing_key

from peekproxy.config import DEFAULT_IP_RANGE_BLACKLIST
from peekproxy.federation.client import FederationClient, build_ssl_context
from peekproxy.federation.discovery import DnspythonLookup
from peekproxy.federation.ip_policy import IpFilter
from peekproxy.federation.signing_key import server_key_document
from tests.support import JsonApp, issue_cert, serve_app

LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]


def loopback_client(
    ca_file: Path, server_name: str | None = None, signing_key: Any = None
) -> FederationClient:
    """A federation client allowed to reach loopback, trusting the test CA."""
    return FederationClient(
        server_name=server_name,
        signing_key=signing_key,
        dns=DnspythonLookup(),
        ip_filter=IpFilter([ipaddress.ip_network(n) for n in DEFAULT_IP_RANGE_BLACKLIST], LOOPBACK),
        ssl_context=build_ssl_context(True, ca_file),
        connect_timeout=5,
        request_timeout=20,
    )


class Peer:
    """Call :meth:`start`; then ``name`` is ``localhost:<port>`` and ``client`` signs as it."""

    def __init__(self, ca: trustme.CA, tmp_path: Path) -> None:
        self.ca, self.tmp_path = ca, tmp_path
        self.signing_key = generate_signing_key("peer")
        self.name = ""
        self.transactions: list[dict[str, Any]] = []
        self.send_status = 200
        self._arrived = trio.Event()
        self.ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))

    async def _key(self, scope: Any, body: bytes) -> tuple[int, Any]:
        return 200, server_key_document(
            self.name, self.signing_key, now_ms=int(time.time() * 1000), valid_for_ms=86_400_000
        )

    async def _send(self, scope: Any, body: bytes) -> tuple[int, Any]:
        txn_id = scope["path"].rsplit("/", 1)[1]
        self.transactions.append({"txn_id": txn_id, "body": json.loads(body)})
        self._arrived.set()
        self._arrived = trio.Event()
        return self.send_status, {"pdus": {}}

    async def start(self, nursery: trio.Nursery) -> None:
        app = JsonApp(
            {
                ("GET", "/_matrix/key/v2/server"): self._key,
                ("PUT", "/_matrix/federation/v1/send/*"): self._send,
            }
        )
        url = await serve_app(
            nursery, app, tls=issue_cert(self.ca, self.tmp_path, "localhost", "127.0.0.1")
        )
        self.name = f"localhost:{url.rsplit(':', 1)[1]}"
        self.client = loopback_client(self.ca_file, self.name, self.signing_key)

    @property
    def pdus(self) -> list[dict[str, Any]]:
        return [pdu for txn in self.transactions for pdu in txn["body"]["pdus"]]

    async def wait_for_pdus(self, count: int, timeout: float = 15) -> list[dict[str, Any]]:
        """Wait until at least ``count`` PDUs have arrived in total."""
        with trio.fail_after(timeout):
            while len(self.pdus) < count:
                await self._arrived.wait()
        return self.pdus

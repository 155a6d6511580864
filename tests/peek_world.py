"""An end-to-end world for remote peeking: a real DNS server, the testbed as the remote
(in this process), peekproxy as a child process, fake servers that do not speak MSC2444;
all over TLS on loopback, every server found through SRV records."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio
import trustme

from peekproxy.testbed.server import Testbed, TestbedListening
from tests.dns import start_dnsmasq
from tests.support import DaemonProcess, JsonApp, issue_cert, serve_app, write_config
from tests.synapse import free_tcp_port
from tests.testbed_support import start_testbed

PEEKPROXY = "peekproxy.test"
TESTBED = "testbed.test"
NO_PEEK = "nopeek.test"  # answers every path like Synapse: 404 M_UNRECOGNIZED
DOWN = "down.test"  # nothing listens there
SECRET = "delegation-secret-for-tests"


EXTRA_SERVERS = ("forger.test", "other.test")


class FakeServer:
    def __init__(self) -> None:
        self.requests_seen: list[str] = []
        self.handler: Callable[[Any, bytes], Awaitable[tuple[int, Any]]] | None = None

    async def dispatch(self, scope: Any, body: bytes) -> tuple[int, Any]:
        if self.handler is None:
            return 404, {"errcode": "M_UNRECOGNIZED", "error": "no handler"}
        return await self.handler(scope, body)


class PeekWorld:
    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self.testbed: Testbed
        self.listening: TestbedListening
        self.daemon: DaemonProcess
        self.config: Path
        self.db_path: Path
        self.env: dict[str, str] = {}
        self.extra_env: dict[str, str] = {}
        self.nopeek_requests: list[dict[str, Any]] = []
        self.dns = ""
        #: The port the SRV record of peekproxy.test points at (the daemon's federation bind).
        self.federation_port = 0

    # -- peekproxy's delegation API ----------------------------------------------------------

    async def peek(
        self,
        room: str,
        *,
        user: str = "@alice:peekproxy.test",
        device: str = "D1",
        hints: list[str] | None = None,
        servers: list[str] | None = None,
        via: str | None = None,
    ) -> httpx.Response:
        params: list[tuple[str, str | int | float | bool | None]] = [
            ("user_id", user),
            ("device_id", device),
        ]
        params += [("server_name", h) for h in hints or []]
        async with httpx.AsyncClient(timeout=60) as http:
            return await http.post(
                f"{via or self.daemon.client}/_peekproxy/v1/peek/{quote(room, safe='')}",
                params=params,
                json={"servers": servers} if servers else {},
                headers={"Authorization": f"Bearer {SECRET}"},
            )

    async def unpeek(
        self, room: str, *, user: str = "@alice:peekproxy.test", device: str = "D1"
    ) -> httpx.Response:
        async with httpx.AsyncClient(timeout=60) as http:
            return await http.post(
                f"{self.daemon.client}/_peekproxy/v1/rooms/{quote(room, safe='')}/unpeek",
                params={"user_id": user, "device_id": device},
                json={},
                headers={"Authorization": f"Bearer {SECRET}"},
            )

    async def sync(
        self,
        *,
        user: str = "@alice:peekproxy.test",
        device: str = "D1",
        since: str | None = None,
        timeout_ms: int = 0,
        full_state: bool = False,
        limit: int | None = None,
        via: str | None = None,
    ) -> dict[str, Any]:
        """The device's delegation ``/sync`` answer, from ``via`` (a base URL: another
        instance, a load balancer) or the daemon."""
        params: dict[str, str] = {"user_id": user, "device_id": device, "timeout": str(timeout_ms)}
        if since:
            params["since"] = since
        if full_state:
            params["full_state"] = "true"
        if limit is not None:
            params["filter"] = json.dumps({"room": {"timeline": {"limit": limit}}})
        async with httpx.AsyncClient(timeout=120) as http:
            response = await http.get(
                f"{via or self.daemon.client}/_peekproxy/v1/sync",
                params=params,
                headers={"Authorization": f"Bearer {SECRET}"},
            )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    # -- peekproxy's database (read-only, while it runs) ---------------------------------------

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def subscription(self, room_id: str) -> dict[str, Any]:
        columns = [
            "state",
            "server",
            "peek_id",
            "remote_interval_ms",
            "last_renewed_ts",
            "renew_at_ts",
            "wanted",
            "pending_deletes_json",
        ]
        [row] = self.rows(
            f"SELECT {', '.join(columns)} FROM subscriptions WHERE room_id = ?", room_id
        )
        return dict(zip(columns, row, strict=True))

    def stream(self, room_id: str) -> list[tuple[str, str | None]]:
        """The room's stream in peekproxy: (kind, body or event ID) per event or gap."""
        out = []
        for kind, event_id, pdu in self.rows(
            "SELECT s.kind, s.event_id, e.pdu_json FROM room_stream s LEFT JOIN events e "
            "ON e.event_id = s.event_id WHERE s.room_id = ? AND s.kind IN ('event', 'gap') "
            "ORDER BY s.stream_pos",
            room_id,
        ):
            body = json.loads(pdu).get("content", {}).get("body") if pdu else None
            out.append((kind, body or event_id))
        return out

    async def add_server(
        self, nursery: trio.Nursery, ca: trustme.CA, tmp_path: Path, name: str
    ) -> FakeServer:
        """Another federation server (its handler set by the test), found through DNS."""
        assert name in EXTRA_SERVERS, name
        server = FakeServer()
        await serve_app(
            nursery,
            JsonApp({(m, "/*"): server.dispatch for m in ("GET", "PUT", "POST", "DELETE")}),
            bind=f"127.0.0.1:{self.ports[name]}",
            tls=issue_cert(ca, tmp_path, name),
        )
        return server

    # -- the testbed ---------------------------------------------------------------------------

    def create_room(self, version: str = "10", **spec: Any) -> str:
        args: dict[str, Any] = {
            "room_version": version,
            "creator": "admin",
            "alias": None,
            "history_visibility": "world_readable",
            "join_rule": "public",
            "encrypted": False,
            "name": None,
            "topic": None,
            "initial_state": [],
        } | spec
        return self.testbed.create_room(**args).room_id

    def send(self, room_id: str, body: str) -> str:
        return self.testbed.send(
            room_id,
            sender="admin",
            type="m.room.message",
            content={"msgtype": "m.text", "body": body},
        )

    def delivered(self, event_id: str) -> bool:
        """Whether peekproxy answered 200 to a transaction holding the event (it stores
        before it answers)."""
        sender = self.testbed.senders.get(PEEKPROXY)
        return sender is not None and any(
            event_id in t.event_ids and t.status == "sent" for t in sender.transactions
        )

    async def wait_delivered(self, *event_ids: str) -> None:
        await self.testbed.wait_until(lambda: all(self.delivered(e) for e in event_ids))

    def log_of(self, action: str) -> list[tuple[str, str, str, str]]:
        return [entry for entry in self.testbed.peek_log if entry[0] == action]

    async def restart(self, spawn: Callable[..., Awaitable[DaemonProcess]], *, kill: bool) -> None:
        import signal

        self.daemon.signal(signal.SIGKILL if kill else signal.SIGTERM)
        await self.daemon.wait()
        self.daemon = await spawn(self.config, env=self.env | self.extra_env)


async def build_world(
    nursery: trio.Nursery,
    ca: trustme.CA,
    tmp_path: Path,
    spawn: Callable[..., Awaitable[DaemonProcess]],
    *,
    peeks_env: dict[str, str] | None = None,
    testbed_peeks: dict[str, Any] | None = None,
    start: bool = True,
) -> PeekWorld:
    """The world; ``start=False``: everything but the daemon (``world.config`` and
    ``world.env`` written, ``world.daemon`` unset: tests/cluster_world.py starts several)."""
    world = PeekWorld()
    pp_port, tb_port, np_port, down_port = (free_tcp_port() for _ in range(4))
    world.ports = {name: free_tcp_port() for name in EXTRA_SERVERS}
    dns = await start_dnsmasq(
        nursery,
        hosts={
            "pp.host.test": "127.0.0.1",
            "tb.host.test": "127.0.0.1",
            "np.host.test": "127.0.0.1",
            "down.host.test": "127.0.0.1",
        },
        srv=[
            (f"_matrix-fed._tcp.{PEEKPROXY}", "pp.host.test", pp_port, 10, 1),
            (f"_matrix-fed._tcp.{TESTBED}", "tb.host.test", tb_port, 10, 1),
            (f"_matrix-fed._tcp.{NO_PEEK}", "np.host.test", np_port, 10, 1),
            (f"_matrix-fed._tcp.{DOWN}", "down.host.test", down_port, 10, 1),
            *(
                (f"_matrix-fed._tcp.{n}", "down.host.test", p, 10, 1)
                for n, p in world.ports.items()
            ),
        ],
    )
    world.dns = dns
    world.federation_port = pp_port
    world.listening, world.testbed = await start_testbed(
        nursery, ca, tmp_path, server_name=TESTBED, port=tb_port, dns=dns, **(testbed_peeks or {})
    )

    async def unrecognized(scope: Any, body: bytes) -> tuple[int, Any]:
        world.nopeek_requests.append({"method": scope["method"], "path": scope["path"]})
        return 404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}

    await serve_app(
        nursery,
        JsonApp(
            {
                ("PUT", "/*"): unrecognized,
                ("DELETE", "/*"): unrecognized,
                ("GET", "/*"): unrecognized,
            }
        ),
        bind=f"127.0.0.1:{np_port}",
        tls=issue_cert(ca, tmp_path, NO_PEEK),
    )

    server_dir = tmp_path / "peekproxy"
    server_dir.mkdir()
    from peekproxy.federation.signing_key import write_new_signing_key

    write_new_signing_key(server_dir / "signing.key")
    (server_dir / "delegation.secret").write_text(SECRET + "\n")
    cert, key = issue_cert(ca, server_dir, PEEKPROXY)
    ca_file = server_dir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    world.config = write_config(
        server_dir,
        server_name=PEEKPROXY,
        binds={"federation": f"127.0.0.1:{pp_port}"},
        extra={
            "listeners.federation": f'tls_certificate_file = "{cert}"\n'
            f'tls_private_key_file = "{key}"',
            "delegation": 'shared_secret_file = "delegation.secret"',
        },
    )
    world.db_path = server_dir / "data" / "peekproxy.db"
    world.env = {
        "PEEKPROXY_FEDERATION__DNS_NAMESERVERS": f'["{dns}"]',
        "PEEKPROXY_FEDERATION__IP_RANGE_WHITELIST": '["127.0.0.0/8"]',
        "PEEKPROXY_FEDERATION__TLS_CA_FILE": str(ca_file),
        "PEEKPROXY_FEDERATION__BACKOFF_INITIAL": "0.1",
        "PEEKPROXY_LOGGING__LEVEL": "INFO",
    } | (peeks_env or {})
    if start:
        world.daemon = await spawn(world.config, env=world.env)
    return world

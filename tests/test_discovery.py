"""Server discovery end to end: a real DNS server (dnsmasq), real TLS servers on their own
loopback addresses, and the federation client, for every row of the spec's resolution table.

Each fake server presents a certificate for exactly the name the spec says the client must
check, so a wrong TLS name fails the handshake; each records the ``Host`` header it got.
"""

from __future__ import annotations

import ipaddress
import json
import random
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from peekproxy.config import DEFAULT_IP_RANGE_BLACKLIST
from peekproxy.federation.client import (
    DestinationBlocked,
    DestinationUnreachable,
    FederationClient,
    build_ssl_context,
)
from peekproxy.federation.discovery import (
    DnspythonLookup,
    SrvRecord,
    WellKnownInvalid,
    order_srv,
    parse_well_known,
    well_known_cache_period,
)
from peekproxy.federation.ip_policy import IpFilter
from tests.dns import start_dnsmasq, start_slow_dns
from tests.support import JsonApp, issue_cert, serve_app

BLACKLIST = [ipaddress.ip_network(n) for n in DEFAULT_IP_RANGE_BLACKLIST]
DEFAULT_PORT = 18448  # stands in for 8448 (federation.default_port)


class World:
    """Fake servers and DNS records for one test."""

    def __init__(self, nursery: trio.Nursery, ca: trustme.CA, tmp_path: Path) -> None:
        self.nursery, self.ca, self.tmp_path = nursery, ca, tmp_path
        self.hosts: dict[str, str] = {}
        self.srv: list[tuple[str, str, int, int, int]] = []
        self.apps: dict[str, JsonApp] = {}

    async def federation_server(self, label: str, ip: str, port: int, cert_name: str) -> JsonApp:
        async def version(scope: Any, body: bytes) -> tuple[int, Any]:
            return 200, {"server": {"name": label}}

        app = JsonApp({("GET", "/_matrix/federation/v1/version"): version})
        await serve_app(
            self.nursery,
            app,
            bind=f"{ip}:{port}",
            tls=issue_cert(self.ca, self.tmp_path, cert_name),
        )
        self.apps[label] = app
        return app

    async def well_known(self, hostname: str, ip: str, handler: Any) -> JsonApp:
        app = JsonApp({("GET", "/.well-known/matrix/server"): handler})
        await serve_app(
            self.nursery, app, bind=f"{ip}:443", tls=issue_cert(self.ca, self.tmp_path, hostname)
        )
        return app

    async def client(
        self,
        *,
        whitelist: bool = True,
        connect_timeout: float = 5,
        request_timeout: float = 10,
        dns_delay: float = 0.0,
    ) -> FederationClient:
        """A client whose DNS is a dnsmasq with the world's records (answering after
        ``dns_delay`` seconds when that is set)."""
        dns = await start_dnsmasq(self.nursery, hosts=self.hosts, srv=self.srv)
        if dns_delay:
            dns = await start_slow_dns(self.nursery, dns, dns_delay)
        ca_file = self.tmp_path / "ca.pem"
        self.ca.cert_pem.write_to_path(str(ca_file))
        return FederationClient(
            server_name=None,
            signing_key=None,
            dns=DnspythonLookup([dns], lifetime=connect_timeout),
            ip_filter=IpFilter(
                BLACKLIST, [ipaddress.ip_network("127.0.0.0/8")] if whitelist else []
            ),
            ssl_context=build_ssl_context(True, ca_file),
            default_port=DEFAULT_PORT,
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
        )


@pytest.fixture
def world(nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path) -> World:
    return World(nursery, tls_ca, tmp_path)


async def version_of(client: FederationClient, server_name: str) -> str:
    answer = await client.get_json(server_name, "/_matrix/federation/v1/version", signed=False)
    return str(answer["server"]["name"])


def well_known_body(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    async def handler(scope: Any, _: bytes) -> tuple[int, Any, dict[str, str]]:
        return status, body, headers or {}

    return handler


async def test_explicit_port(world: World) -> None:
    world.hosts["explicit.test"] = "127.10.0.1"
    app = await world.federation_server("explicit", "127.10.0.1", 8449, "explicit.test")
    client = await world.client()
    assert await version_of(client, "explicit.test:8449") == "explicit"
    assert app.requests[0]["headers"]["host"] == "explicit.test:8449"
    assert (await client.resolver.resolve("explicit.test:8449")).step == "2 explicit-port"


async def test_well_known_delegation_with_port(world: World) -> None:
    world.hosts |= {"wk.test": "127.10.0.2", "delegated.test": "127.10.0.3"}
    wk = await world.well_known(
        "wk.test", "127.10.0.2", well_known_body({"m.server": "delegated.test:8450"})
    )
    app = await world.federation_server("delegated", "127.10.0.3", 8450, "delegated.test")
    client = await world.client()
    assert await version_of(client, "wk.test") == "delegated"
    assert app.requests[0]["headers"]["host"] == "delegated.test:8450"
    # Cached: a second request does not fetch the well-known again.
    assert await version_of(client, "wk.test") == "delegated"
    client.resolver.forget("wk.test")
    assert await version_of(client, "wk.test") == "delegated"
    assert len(wk.requests) == 1


async def test_well_known_delegation_without_port_uses_srv_of_the_delegate(world: World) -> None:
    world.hosts |= {"wk2.test": "127.10.0.4", "tgt2.test": "127.10.0.5"}
    world.srv.append(("_matrix-fed._tcp.deleg2.test", "tgt2.test", 8451, 10, 5))
    await world.well_known("wk2.test", "127.10.0.4", well_known_body({"m.server": "deleg2.test"}))
    # The certificate names the delegated host, not the SRV target.
    app = await world.federation_server("deleg2", "127.10.0.5", 8451, "deleg2.test")
    client = await world.client()
    assert await version_of(client, "wk2.test") == "deleg2"
    assert app.requests[0]["headers"]["host"] == "deleg2.test"
    assert (await client.resolver.resolve("wk2.test")).step == "3.3 srv _matrix-fed._tcp"


async def test_matrix_fed_srv_in_priority_order(world: World) -> None:
    world.hosts |= {
        "srv.test": "127.10.0.6",
        "srvtgt.test": "127.10.0.7",
        "dead.test": "127.10.0.8",
        "backup.test": "127.10.0.7",
    }
    world.srv += [
        ("_matrix-fed._tcp.srv.test", "backup.test", 8460, 20, 1),
        ("_matrix-fed._tcp.srv.test", "srvtgt.test", 8452, 10, 5),
        ("_matrix-fed._tcp.srv.test", "dead.test", 8452, 5, 5),  # nothing listens there
    ]
    app = await world.federation_server("srv", "127.10.0.7", 8452, "srv.test")
    client = await world.client()  # no well-known server on 127.10.0.6:443: falls to SRV
    assert await version_of(client, "srv.test") == "srv"
    assert app.requests[0]["headers"]["host"] == "srv.test"
    resolution = await client.resolver.resolve("srv.test")
    assert resolution.targets == (("dead.test", 8452), ("srvtgt.test", 8452), ("backup.test", 8460))


async def test_legacy_matrix_srv(world: World) -> None:
    world.hosts |= {"legacy.test": "127.10.0.9", "legtgt.test": "127.10.0.9"}
    world.srv.append(("_matrix._tcp.legacy.test", "legtgt.test", 8453, 0, 0))
    app = await world.federation_server("legacy", "127.10.0.9", 8453, "legacy.test")
    client = await world.client()
    assert await version_of(client, "legacy.test") == "legacy"
    assert app.requests[0]["headers"]["host"] == "legacy.test"
    assert (await client.resolver.resolve("legacy.test")).step == "5 srv _matrix._tcp"


@pytest.mark.parametrize("via", ["direct", "well-known"])
async def test_srv_target_dot_means_no_federation_service(world: World, via: str) -> None:
    """A lone ``_matrix-fed._tcp`` record with target ``.`` (RFC 2782: "decidedly not
    available"): stop, do not fall through to ``_matrix._tcp`` or the default port."""
    host = "nofed.test" if via == "direct" else "nofed-deleg.test"
    world.hosts |= {"nofed.test": "127.10.9.1", "nofed-deleg.test": "127.10.9.1"}
    world.srv += [
        (f"_matrix-fed._tcp.{host}", ".", 0, 0, 0),
        (f"_matrix._tcp.{host}", "nofed.test", 8458, 0, 0),
    ]
    if via == "well-known":
        await world.well_known("nofed.test", "127.10.9.1", well_known_body({"m.server": host}))
    legacy = await world.federation_server("legacy", "127.10.9.1", 8458, host)
    default = await world.federation_server("default", "127.10.9.1", DEFAULT_PORT, host)
    client = await world.client()
    with pytest.raises(DestinationUnreachable, match=rf"_matrix-fed\._tcp\.{host} .*'\.'"):
        await version_of(client, "nofed.test")
    assert legacy.requests == [] and default.requests == []


async def test_trickled_well_known_is_cut_at_its_time_budget(world: World) -> None:
    """A well-known server sending its body one byte at a time (each byte well within the
    read timeout) cannot hold discovery beyond one budget (connect_timeout) for the fetch."""
    world.hosts["trickle.test"] = "127.10.9.2"
    body = json.dumps({"m.server": "never.test:1"}).encode()  # never used if cut in time

    async def trickle(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await JsonApp({})(scope, receive, send)
            return
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i in range(len(body)):
            await trio.sleep(0.2)
            await send({"type": "http.response.body", "body": body[i : i + 1], "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    await serve_app(
        world.nursery,
        trickle,
        bind="127.10.9.2:443",
        tls=issue_cert(world.ca, world.tmp_path, "trickle.test"),
    )
    await world.federation_server("fallback", "127.10.9.2", DEFAULT_PORT, "trickle.test")
    client = await world.client(connect_timeout=1)
    started = trio.current_time()
    with trio.fail_after(len(body) * 0.2 - 1):  # the whole trickle takes ~6 s
        assert await version_of(client, "trickle.test") == "fallback"
    assert trio.current_time() - started < 3
    assert (await client.resolver.resolve("trickle.test")).step == "6 default-port"


async def test_name_resolution_counts_against_the_request_deadline(world: World) -> None:
    """Discovery (well-known, SRV and address lookups) is inside the request's timeout: with
    DNS answering after 1 s per query, a 1.5 s request gives up after 1.5 s, not after the
    ~5 s the lookups take."""
    world.hosts["slowdns.test"] = "127.10.9.3"
    app = await world.federation_server("slow", "127.10.9.3", DEFAULT_PORT, "slowdns.test")
    client = await world.client(dns_delay=1.0, request_timeout=1.5)
    started = trio.current_time()
    with pytest.raises(DestinationUnreachable, match=r"timed out after 1\.5 s while resolving"):
        await version_of(client, "slowdns.test")
    assert trio.current_time() - started < 3
    assert app.requests == []


async def test_default_port_fallback(world: World) -> None:
    world.hosts["plain.test"] = "127.10.0.10"
    app = await world.federation_server("plain", "127.10.0.10", DEFAULT_PORT, "plain.test")
    client = await world.client()
    assert await version_of(client, "plain.test") == "plain"
    assert app.requests[0]["headers"]["host"] == "plain.test"


async def test_ip_literal_checks_the_certificate_for_the_ip(world: World) -> None:
    app = await world.federation_server("ip", "127.10.0.11", 8455, "127.10.0.11")
    await world.federation_server("ip-default", "127.10.0.11", DEFAULT_PORT, "127.10.0.11")
    client = await world.client()
    assert await version_of(client, "127.10.0.11:8455") == "ip"
    assert app.requests[0]["headers"]["host"] == "127.10.0.11:8455"
    assert await version_of(client, "127.10.0.11") == "ip-default"


async def test_wrong_certificate_name_is_refused(world: World) -> None:
    world.hosts["impostor.test"] = "127.10.0.12"
    await world.federation_server("impostor", "127.10.0.12", 8456, "someone-else.test")
    client = await world.client()
    with pytest.raises(DestinationUnreachable, match="certificate"):
        await version_of(client, "impostor.test:8456")


async def test_blacklisted_address_is_refused_before_connecting(world: World) -> None:
    world.hosts["explicit.test"] = "127.10.0.13"
    app = await world.federation_server("explicit", "127.10.0.13", 8449, "explicit.test")
    client = await world.client(whitelist=False)
    with pytest.raises(DestinationBlocked, match=r"127\.10\.0\.13"):
        await version_of(client, "explicit.test:8449")
    with pytest.raises(DestinationBlocked):
        await version_of(client, "127.10.0.13:8449")
    assert app.requests == []


@pytest.mark.parametrize(
    "case",
    ["oversized", "not-json", "no-m-server", "bad-m-server", "http-error", "redirect-loop"],
)
async def test_unusable_well_known_falls_back(world: World, case: str) -> None:
    world.hosts["odd.test"] = "127.10.0.14"
    handlers = {
        "oversized": well_known_body(
            json.dumps({"m.server": "never.test:1", "pad": "x" * 60_000}).encode()
        ),
        "not-json": well_known_body(b"<html>not json</html>"),
        "no-m-server": well_known_body({"server": "never.test"}),
        "bad-m-server": well_known_body({"m.server": "not a name"}),
        "http-error": well_known_body({"errcode": "M_UNKNOWN"}, status=500),
        "redirect-loop": well_known_body(
            b"", status=302, headers={"location": "/.well-known/matrix/server"}
        ),
    }
    wk = await world.well_known("odd.test", "127.10.0.14", handlers[case])
    await world.federation_server("fallback", "127.10.0.14", DEFAULT_PORT, "odd.test")
    client = await world.client()
    assert await version_of(client, "odd.test") == "fallback"
    assert len(wk.requests) >= 1


async def test_well_known_redirect_is_followed(world: World) -> None:
    world.hosts |= {"redir.test": "127.10.0.15", "target.test": "127.10.0.16"}
    app = JsonApp(
        {
            ("GET", "/.well-known/matrix/server"): well_known_body(
                b"", status=301, headers={"location": "/moved"}
            ),
            ("GET", "/moved"): well_known_body({"m.server": "target.test:8457"}),
        }
    )
    await serve_app(
        world.nursery,
        app,
        bind="127.10.0.15:443",
        tls=issue_cert(world.ca, world.tmp_path, "redir.test"),
    )
    await world.federation_server("target", "127.10.0.16", 8457, "target.test")
    client = await world.client()
    assert await version_of(client, "redir.test") == "target"


async def test_unknown_name_is_unreachable_with_a_reason(world: World) -> None:
    client = await world.client()
    with pytest.raises(DestinationUnreachable, match=r"nowhere\.test"):
        await version_of(client, "nowhere.test")


# -- pure parts ------------------------------------------------------------------------------


def test_srv_order_is_priority_then_weighted() -> None:
    records = [
        SrvRecord(10, 0, 1, "c"),
        SrvRecord(5, 10, 1, "a"),
        SrvRecord(10, 90, 1, "b"),
        SrvRecord(1, 1, 1, "."),
    ]
    firsts = [order_srv(records, random.Random(seed))[1].target for seed in range(200)]
    assert all(o[0].target == "a" for o in [order_srv(records, random.Random(1))])
    assert firsts.count("b") > firsts.count("c")  # weight 90 beats weight 0 at priority 10
    assert {r.target for r in order_srv(records)} == {"a", "b", "c"}  # "." is dropped


def test_well_known_parsing() -> None:
    assert str(parse_well_known(200, b'{"m.server": "a.test:8448"}')) == "a.test:8448"
    for status, body in [
        (404, b"{}"),
        (200, b"[]"),
        (200, b'{"m.server": 5}'),
        (200, b"x" * 60_000),
    ]:
        with pytest.raises(WellKnownInvalid):
            parse_well_known(status, body)


def test_well_known_cache_period() -> None:
    assert well_known_cache_period({}) == 24 * 3600
    assert well_known_cache_period({"Cache-Control": "max-age=600"}) == 600
    assert well_known_cache_period({"cache-control": "max-age=10"}) == 300  # at least 5 min
    assert well_known_cache_period({"cache-control": "max-age=999999"}) == 48 * 3600
    assert well_known_cache_period({"cache-control": "no-store"}) == 300


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "::1",
        "::ffff:127.0.0.1",
        "::127.0.0.1",
        "64:ff9b::7f00:1",
        "2002:7f00:1::1",
        "::ffff:0.0.0.0",
        "0.0.0.0",
        "::",
        "10.1.2.3",
        "fe80::1",
    ],
)
def test_ip_policy_blocks_embedded_private_addresses(address: str) -> None:
    assert not IpFilter(BLACKLIST).allowed(address)


def test_ip_policy_allows_public_and_whitelisted() -> None:
    assert IpFilter(BLACKLIST).allowed("93.184.216.34")
    assert IpFilter(BLACKLIST).allowed("2606:2800:220:1::1")
    loopback = IpFilter(BLACKLIST, [ipaddress.ip_network("127.0.0.0/8")])
    assert loopback.allowed("127.0.0.1") and loopback.allowed("::ffff:127.0.0.1")

"""A real DNS server for tests: dnsmasq on a loopback UDP/TCP port, authoritative for
``.test`` (unknown names get NXDOMAIN), with the SRV and A records a test asks for."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
import trio

REQUIRE_ALL = os.environ.get("PEEKPROXY_TEST_REQUIRE_ALL") == "1"


def dnsmasq_binary() -> str:
    """Path of dnsmasq; skips the test when it is missing (fails in CI instead)."""
    found = shutil.which("dnsmasq") or (
        "/usr/sbin/dnsmasq" if Path("/usr/sbin/dnsmasq").exists() else None
    )
    if found is None:
        message = "dnsmasq is not installed (apt-get install dnsmasq-base)"
        if REQUIRE_ALL:
            pytest.fail(message)
        pytest.skip(message)
    return found


def free_udp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port


async def start_dnsmasq(
    nursery: trio.Nursery,
    *,
    hosts: Mapping[str, str] = {},
    srv: Iterable[tuple[str, str, int, int, int]] = (),
) -> str:
    """Start dnsmasq; returns its ``"127.0.0.1:port"``. It is stopped with the nursery.

    ``hosts`` maps names to IPv4 addresses; ``srv`` holds
    ``(name, target, port, priority, weight)`` records; a target of ``"."`` gives the
    RFC 2782 "service not offered" record (target ``.``; port, priority, weight ignored).
    """
    binary = dnsmasq_binary()
    for attempt in range(5):  # another process may take the port between our check and use
        port = free_udp_port()
        args = [
            binary,
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            f"--port={port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--user=root",
            "--group=root",
            "--local=/test/",
            "--log-facility=-",
            "--pid-file=",
        ]
        args += [f"--host-record={name},{ip}" for name, ip in hosts.items()]
        args += [
            f"--srv-host={n}" if t == "." else f"--srv-host={n},{t},{p},{prio},{w}"
            for n, t, p, prio, w in srv
        ]
        process = await trio.lowlevel.open_process(args, stderr=subprocess.PIPE)
        assert process.stderr is not None
        seen = b""
        with trio.fail_after(10):
            while b"started, version" not in seen:
                chunk = await process.stderr.receive_some(4096)
                if not chunk:
                    break
                seen += chunk
        if b"started, version" in seen:
            break
        await process.wait()
        if b"Address already in use" not in seen or attempt == 4:
            raise RuntimeError(f"dnsmasq failed to start: {seen.decode(errors='replace')}")

    async def drain_then_stop() -> None:
        assert process.stderr is not None
        try:
            while await process.stderr.receive_some(4096):
                pass
        finally:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()

    nursery.start_soon(drain_then_stop)
    return f"127.0.0.1:{port}"


async def start_slow_dns(nursery: trio.Nursery, upstream: str, delay: float) -> str:
    """A DNS server on a loopback UDP port that answers every query as ``upstream``
    (``"ip:port"``, e.g. a dnsmasq) does, but only after ``delay`` seconds; returns its
    ``"127.0.0.1:port"``. It stops with the nursery."""
    host, _, port = upstream.rpartition(":")
    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await listener.bind(("127.0.0.1", 0))

    async def relay(query: bytes, asker: tuple[str, int]) -> None:
        await trio.sleep(delay)
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
            await out.connect((host, int(port)))
            await out.send(query)
            with trio.move_on_after(5):
                await listener.sendto(await out.recv(65535), asker)

    async def serve() -> None:
        with listener:
            while True:
                query, asker = await listener.recvfrom(65535)
                nursery.start_soon(relay, query, asker)

    nursery.start_soon(serve)
    return f"127.0.0.1:{listener.getsockname()[1]}"

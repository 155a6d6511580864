"""Real reverse proxies for end-to-end tests: Debian's nginx and Caddy, each running the
configuration shipped in ``contrib/`` (docs/reverse-proxy.md) with only its placeholders
filled in, on a free loopback port, its pid file, logs and temporary files in a directory of
the test's own.

A missing binary skips the test locally and fails it in CI (``PEEKPROXY_TEST_REQUIRE_ALL=1``),
as for dnsmasq (tests/dns.py).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import httpx
import pytest
import trio
import trustme

from tests.dns import REQUIRE_ALL
from tests.peek_world import PeekWorld
from tests.synapse import REPO, Synapse, free_tcp_port

if TYPE_CHECKING:
    from tests.conftest import Spawn

NGINX_CONF = REPO / "contrib" / "nginx" / "peekproxy.conf"
CADDYFILE = REPO / "contrib" / "caddy" / "Caddyfile"
NGINX_CLUSTER_CONF = REPO / "contrib" / "nginx" / "peekproxy-cluster.conf"

#: The reverse proxies the tests run through (the ``kind`` of :func:`start_reverse_proxy`).
KINDS = ("nginx", "caddy")

#: The main nginx.conf around the shipped server block: everything in the test's directory.
NGINX_MAIN = """\
{user}pid {d}/nginx.pid;
error_log {d}/error.log info;
worker_processes 1;
events {{ worker_connections 512; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    include {d}/peekproxy.conf;
}}
"""

#: Caddy's global options for tests: no admin endpoint, no certificates.
CADDY_GLOBAL = "{\n\tadmin off\n\tauto_https off\n}\n\n"


def proxy_binary(kind: str) -> str:
    """The path of ``nginx`` or ``caddy``; skips the test when missing (fails in CI)."""
    found = shutil.which(kind) or next(
        (str(p) for p in (Path("/usr/sbin") / kind, Path("/usr/bin") / kind) if p.exists()), None
    )
    if found is None:
        message = f"{kind} is not installed (apt-get install {kind})"
        if REQUIRE_ALL:
            pytest.fail(message)
        pytest.skip(message)
    return found


def render(kind: str, *, port: int, homeserver: str, peekproxy: str) -> str:
    """The shipped configuration of ``kind`` with its placeholders filled in: listening on
    ``127.0.0.1:port``; ``homeserver`` and ``peekproxy`` are ``host:port`` addresses."""
    if kind == "nginx":
        text, listen = NGINX_CONF.read_text(), f"127.0.0.1:{port}"
        text = text.replace("__LISTEN__", listen)
    else:
        text = CADDY_GLOBAL + CADDYFILE.read_text().replace("__SITE_ADDRESS__", f"http://:{port}")
    text = text.replace("__HOMESERVER_ADDRESS__", homeserver)
    text = text.replace("__PEEKPROXY_ADDRESS__", peekproxy)
    assert not re.search(r"__[A-Z_]+__", text), "a placeholder was left unfilled"
    return text


def render_cluster(
    *, federation: int, client: int, tls: tuple[Path, Path], instances: list[tuple[str, str]]
) -> str:
    """contrib/nginx/peekproxy-cluster.conf with its placeholders filled in: TLS federation
    on ``127.0.0.1:federation``, plain HTTP on ``127.0.0.1:client``; ``instances`` are three
    (client, federation) ``host:port`` pairs."""
    text = NGINX_CLUSTER_CONF.read_text()
    text = text.replace("__FEDERATION_LISTEN__", f"127.0.0.1:{federation} ssl")
    text = text.replace("__CLIENT_LISTEN__", f"127.0.0.1:{client}")
    text = text.replace("__TLS_CERTIFICATE__", str(tls[0]))
    text = text.replace("__TLS_CERTIFICATE_KEY__", str(tls[1]))
    for n, (client_bind, federation_bind) in enumerate(instances, start=1):
        text = text.replace(f"__PEEKPROXY_{n}_CLIENT__", client_bind)
        text = text.replace(f"__PEEKPROXY_{n}_FEDERATION__", federation_bind)
    assert not re.search(r"__[A-Z0-9_]+__", text.split("\nupstream", 1)[1]), "a placeholder left"
    return text


@dataclass
class ReverseProxy:
    """A running nginx or Caddy: ``url`` is its base URL (plain HTTP on loopback)."""

    kind: str
    url: str
    directory: Path
    process: trio.Process

    @property
    def log(self) -> str:
        """What the proxy logged (nginx's error log; Caddy's stderr)."""
        path = self.directory / ("error.log" if self.kind == "nginx" else "caddy.log")
        return path.read_text(errors="replace") if path.exists() else ""

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


def _prepare(kind: str, directory: Path, config: str) -> tuple[list[str], dict[str, str], BinaryIO]:
    """The command line and environment of ``kind`` run with ``config`` in ``directory``, and
    the open file its output goes to (Caddy logs there; nginx to its error.log)."""
    binary = proxy_binary(kind)
    directory.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if kind == "nginx":
        user = "user root root;\n" if os.geteuid() == 0 else ""  # workers may write the tmpdir
        (directory / "nginx.conf").write_text(NGINX_MAIN.format(d=directory, user=user))
        (directory / "peekproxy.conf").write_text(config)
        args = [binary, "-p", f"{directory}/", "-c", f"{directory}/nginx.conf"]
        args += ["-e", f"{directory}/error.log", "-g", "daemon off;"]
    else:
        (directory / "Caddyfile").write_text(config)
        for name in ("home", "data", "config"):
            (directory / name).mkdir(exist_ok=True)
        env |= {
            "HOME": str(directory / "home"),
            "XDG_DATA_HOME": str(directory / "data"),
            "XDG_CONFIG_HOME": str(directory / "config"),
        }
        args = [binary, "run", "--config", str(directory / "Caddyfile"), "--adapter", "caddyfile"]
    return args, env, open(directory / "caddy.log", "ab")


async def start_reverse_proxy(
    directory: Path,
    kind: str,
    *,
    homeserver: str = "",
    peekproxy: str = "",
    rendered: tuple[int, str] | None = None,
) -> ReverseProxy:
    """Start ``kind`` (nginx or caddy) with the shipped configuration and wait (≤ 30 s) until
    it answers HTTP. ``homeserver`` and ``peekproxy`` are ``host:port``; or ``rendered``:
    (the plain-HTTP port it listens on, another rendered configuration)."""
    port, config = rendered or (free_tcp_port(), "")
    config = config or render(kind, port=port, homeserver=homeserver, peekproxy=peekproxy)
    args, env, log = await trio.to_thread.run_sync(_prepare, kind, directory, config)
    with log:
        process = await trio.lowlevel.open_process(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=directory
        )
    proxy = ReverseProxy(kind, f"http://127.0.0.1:{port}", directory, process)
    with trio.move_on_after(30) as waiting:
        async with httpx.AsyncClient(timeout=2) as http:
            while process.returncode is None:
                try:
                    await http.get(f"{proxy.url}/.well-known/ready-check")
                    break
                except httpx.TransportError:
                    await trio.sleep(0.05)
    if waiting.cancelled_caught or process.returncode is not None:
        await proxy.stop()
        raise RuntimeError(f"{kind} did not start:\n{proxy.log}")
    return proxy


StartProxy = Callable[..., Awaitable[ReverseProxy]]


@pytest.fixture
async def reverse_proxies(tmp_path: Path) -> AsyncIterator[StartProxy]:
    """``await reverse_proxies(kind, homeserver=..., peekproxy=...)`` starts nginx or Caddy
    with the shipped configuration; every one is stopped when the test ends (a process
    fixture: tests using it are marked slow by tests/conftest.py)."""
    started: list[ReverseProxy] = []

    async def _start(kind: str, **kwargs: Any) -> ReverseProxy:
        directory = tmp_path / f"{kind}-{len(started)}"
        proxy = await start_reverse_proxy(directory, kind, **kwargs)
        started.append(proxy)
        return proxy

    try:
        yield _start
    finally:
        for proxy in started:
            await proxy.stop()


def address(url: str) -> str:
    """``host:port`` of a base URL."""
    return url.split("://", 1)[1].rstrip("/")


@dataclass
class Fronted:
    """peekproxy in front of the Synapse fixture with the testbed as a remote server
    (``world``, from :func:`tests.front_support.front_world`), and
    ``proxy(kind)``: nginx or Caddy started on the shipped configuration in front of both."""

    world: PeekWorld
    synapse: Synapse
    start_proxy: StartProxy

    async def proxy(self, kind: str) -> ReverseProxy:
        return await self.start_proxy(
            kind,
            homeserver=address(self.synapse.client),
            peekproxy=address(self.world.daemon.client),
        )


@pytest.fixture
async def fronted(
    synapse: Synapse,
    nursery: trio.Nursery,
    tls_ca: trustme.CA,
    tmp_path: Path,
    spawn: Spawn,
    reverse_proxies: StartProxy,
) -> Fronted:
    # Imported here: tests.front_support imports tests.conftest, which imports this module.
    from tests.front_support import front_world

    # The client listener on a fixed port: a restarted peekproxy is where the proxy looks.
    world = await front_world(
        synapse,
        nursery,
        tls_ca,
        tmp_path,
        spawn,
        env={"PEEKPROXY_LISTENERS__CLIENT__BIND": f"127.0.0.1:{free_tcp_port()}"},
    )
    return Fronted(world, synapse, reverse_proxies)

"""No request may stop a listener (issue 10 item 1; peekproxy/serving/guards.py).

Real processes, real sockets: ``peekproxy run`` (federation over TLS with ALPN ``h2``, client
and metrics listeners in plain HTTP, where HTTP/2 is h2c by prior knowledge) and ``peekproxy
testbed`` (federation over TLS, admin in plain HTTP). Each listener gets HTTP/2 requests
with bodies larger than the flow-control window, and then batches of malformed HTTP/1.1,
HTTP/2 and TLS traffic (tests/http_fuzz.py); after every batch the process must be alive,
answer over HTTP/1.1 and HTTP/2, and an HTTP/2 connection opened before the batch must still
answer on the same connection.
"""

from __future__ import annotations

import os
import re
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trio
import trustme

from peekproxy.serving import guards, install_guards
from tests import http_fuzz
from tests.conftest import Spawn
from tests.support import DaemonProcess, issue_cert, write_config
from tests.synapse import free_tcp_port
from tests.testbed_support import argv_for_testbed

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Listener:
    """One listener under test: its base URL, a path it answers with 200, and a request
    that it answers with an error without reading the body."""

    name: str
    url: str
    ok_path: str
    early_method: str
    early_path: str
    early_status: int
    process: DaemonProcess

    @property
    def tls(self) -> bool:
        return self.url.startswith("https://")

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.split("://", 1)[1].rsplit(":", 1)
        return host, int(port)


@dataclass
class Servers:
    daemon: DaemonProcess
    testbed: DaemonProcess
    listeners: list[Listener]
    ca: Path


async def _start_testbed_process(
    nursery: trio.Nursery, ca: trustme.CA, directory: Path
) -> tuple[DaemonProcess, str, str]:
    """``peekproxy testbed`` as a child process: (process, federation URL, admin URL)."""
    port = free_tcp_port()
    cert, key = issue_cert(ca, directory, "localhost", "127.0.0.1")
    process = await trio.lowlevel.open_process(
        argv_for_testbed(
            f"localhost:{port}",
            directory / "testbed-data",
            federation_bind=f"127.0.0.1:{port}",
            tls=(cert, key),
        ),
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("PEEKPROXY_")},
    )
    testbed = DaemonProcess(process)
    nursery.start_soon(testbed._pump)
    with trio.fail_after(30):
        match = await testbed.wait_for_log(rb"testbed ready: .* federation=(\S+) admin=(\S+)")
    return testbed, match.group(1).decode(), match.group(2).decode()


@pytest.fixture
async def servers(
    server_dir: Path,
    tls_files: tuple[Path, Path, Path],
    tls_ca: trustme.CA,
    spawn: Spawn,
) -> AsyncIterator[Servers]:
    cert, key, ca = tls_files
    config = write_config(
        server_dir,
        extra={
            "listeners.federation": f'tls_certificate_file = "{cert}"\n'
            f'tls_private_key_file = "{key}"'
        },
    )
    daemon = await spawn(config)
    async with trio.open_nursery() as nursery:
        testbed, testbed_federation, testbed_admin = await _start_testbed_process(
            nursery, tls_ca, server_dir
        )
        try:
            listeners = [
                Listener(
                    "federation",
                    daemon.federation,
                    "/_matrix/federation/v1/version",
                    "PUT",
                    "/_matrix/federation/v1/send/1",
                    401,
                    daemon,
                ),
                Listener(
                    "client",
                    daemon.client,
                    "/health",
                    "POST",
                    "/_peekproxy/v1/peek/%21room%3Aremote.test?user_id=%40a%3Ab&device_id=D",
                    403,
                    daemon,
                ),
                Listener("metrics", daemon.metrics, "/metrics", "POST", "/metrics", 405, daemon),
                Listener(
                    "testbed federation",
                    testbed_federation,
                    "/_matrix/federation/v1/version",
                    "PUT",
                    "/_matrix/federation/v1/peek/%21r%3Ax/abc?ver=10",
                    401,
                    testbed,
                ),
                Listener(
                    "testbed admin",
                    testbed_admin,
                    "/_testbed/v1/rooms",
                    "POST",
                    "/_testbed/v1/rooms",
                    401,
                    testbed,
                ),
            ]
            yield Servers(daemon, testbed, listeners, ca)
        finally:
            if testbed.process.returncode is None:
                testbed.process.kill()
            await testbed.process.wait()
            nursery.cancel_scope.cancel()


class RawH2:
    """A client HTTP/2 connection (the ``h2`` package) on one socket, for proving that a
    connection opened before some traffic is still served afterwards."""

    def __init__(self, stream: trio.abc.Stream, authority: str, scheme: str) -> None:
        self.stream = stream
        self.authority = authority
        self.scheme = scheme
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )

    @classmethod
    async def open(cls, listener: Listener, ca: Path) -> RawH2:
        host, port = listener.address
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        if listener.tls:
            context = ssl.create_default_context(cafile=str(ca))
            context.set_alpn_protocols(["h2"])
            tls = trio.SSLStream(stream, context, server_hostname="localhost")
            await tls.do_handshake()
            assert tls.selected_alpn_protocol() == "h2"
            stream = tls
        client = cls(stream, f"{host}:{port}", "https" if listener.tls else "http")
        client.conn.initiate_connection()
        await client.stream.send_all(client.conn.data_to_send())
        return client

    async def get(self, path: str) -> int:
        """``GET path`` on a new stream of this connection; the response status."""
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream_id,
            [
                (":method", "GET"),
                (":path", path),
                (":scheme", self.scheme),
                (":authority", self.authority),
            ],
            end_stream=True,
        )
        await self.stream.send_all(self.conn.data_to_send())
        status = 0
        with trio.fail_after(10):
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise AssertionError("the server closed the HTTP/2 connection")
                for event in self.conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        self.conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        raise AssertionError(f"the server sent GOAWAY: {event}")
                    elif isinstance(event, h2.events.StreamReset):
                        raise AssertionError(f"the server reset the stream: {event}")
                    elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                        await self.stream.send_all(self.conn.data_to_send())
                        return status
                await self.stream.send_all(self.conn.data_to_send())

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def _http(ca: Path, *, http2: bool) -> httpx.AsyncClient:
    """HTTP/2 only (ALPN ``h2``; h2c by prior knowledge for http://), or HTTP/1.1 only."""
    return httpx.AsyncClient(
        verify=ssl.create_default_context(cafile=str(ca)),
        http1=not http2,
        http2=http2,
        timeout=20,
    )


async def _assert_serving(servers: Servers, listener: Listener, keeper: RawH2 | None) -> None:
    """The process is alive, the listener answers over HTTP/1.1 and HTTP/2, and the
    connection ``keeper`` (opened earlier) still answers."""
    assert listener.process.process.returncode is None, listener.process.log[-4000:]
    for http2 in (False, True):
        async with _http(servers.ca, http2=http2) as http:
            response = await http.get(listener.url + listener.ok_path)
        assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        assert response.status_code in (200, 401), (listener.name, response.text)
    if keeper is not None:
        assert await keeper.get(listener.ok_path) in (200, 401)
    if listener.process is servers.testbed:
        async with _http(servers.ca, http2=False) as http:
            health = await http.get(f"{servers.daemon.client}/health")
        assert health.json() == {"status": "ok"}


async def test_large_http2_bodies_are_answered_and_every_listener_keeps_serving(
    servers: Servers,
) -> None:
    """hypercorn #329: a body past the 64 KiB window, answered before it is read, used to
    raise KeyError in hypercorn's h2 protocol and end the process (exit 1)."""
    for listener in servers.listeners:
        keeper = await RawH2.open(listener, servers.ca)
        try:
            assert await keeper.get(listener.ok_path) in (200, 401)
            async with _http(servers.ca, http2=True) as http:
                for size in (65_536, 200_000, 2_000_000):
                    response = await http.request(
                        listener.early_method,
                        listener.url + listener.early_path,
                        content=b"x" * size,
                        headers={"content-type": "application/json"},
                    )
                    assert response.http_version == "HTTP/2"
                    assert response.status_code == listener.early_status, (
                        listener.name,
                        size,
                        response.text,
                    )
                    assert response.json()["errcode"].startswith("M_")
                    # A body without content-length (a streamed upload) as well.

                    async def chunks(size: int = size) -> AsyncIterator[bytes]:
                        for _ in range(size // 16384):
                            yield b"y" * 16384

                    streamed = await http.request(
                        listener.early_method, listener.url + listener.early_path, content=chunks()
                    )
                    assert streamed.status_code == listener.early_status
            await _assert_serving(servers, listener, keeper)
        finally:
            await keeper.aclose()
    assert "failed and was closed" not in servers.daemon.log
    assert "failed and was closed" not in servers.testbed.log


async def test_malformed_traffic_leaves_every_listener_serving(servers: Servers) -> None:
    """Fuzz-style: generated malformed HTTP/1.1, HTTP/2 and TLS input (tests/http_fuzz.py,
    seed ``PEEKPROXY_FUZZ_SEED``), batch by batch, against each listener."""
    seed = int(os.environ.get("PEEKPROXY_FUZZ_SEED", "2444"))
    started = trio.current_time()
    sent = 0
    for index, listener in enumerate(servers.listeners):
        host, port = listener.address
        target = http_fuzz.Target(
            host, port, tls=listener.tls, ca=servers.ca, path=listener.ok_path
        )
        keeper = await RawH2.open(listener, servers.ca)
        try:
            for batch in http_fuzz.batches(seed + index, target):
                await http_fuzz.send_all(target, batch.cases)
                sent += len(batch.cases)
                try:
                    await _assert_serving(servers, listener, keeper)
                except AssertionError as e:
                    raise AssertionError(f"{listener.name} after batch {batch.name!r}: {e}") from e
        finally:
            await keeper.aclose()
    elapsed = trio.current_time() - started
    print(f"{sent} malformed connections in {elapsed:.1f} s")
    for process in (servers.daemon, servers.testbed):
        # Failures that the isolation caught (each ended only its own connection).
        isolated = re.findall(r"failed and was closed \(the listener goes on\): (.*)", process.log)
        print(f"connections ended by an error inside hypercorn: {sorted(set(isolated))}")
    assert elapsed < 60


async def test_a_failing_connection_ends_only_that_connection(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever hypercorn raises inside one connection (here: a planted error) is logged and
    closes that connection; the listener and its other connections go on."""
    from hypercorn.protocol.h11 import H11Protocol

    from peekproxy.serving import hypercorn_config, start_listener
    from tests.support import JsonApp

    original = H11Protocol.handle

    async def planted(self: H11Protocol, event: Any) -> None:
        if b"BOOM" in getattr(event, "data", b""):
            raise RuntimeError("planted failure")
        await original(self, event)

    monkeypatch.setattr(H11Protocol, "handle", planted)
    app: Any = JsonApp({("GET", "/ok"): lambda scope, body: _ok()})
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        url = await start_listener(
            nursery,
            "test",
            app,
            hypercorn_config("127.0.0.1:0", grace=0.1, access_log=False),
            shutdown,
        )
        host, port = url.removeprefix("http://").rsplit(":", 1)
        async with httpx.AsyncClient(http1=True) as http:
            assert (await http.get(f"{url}/ok")).status_code == 200  # a kept-alive connection
            boom = await trio.open_tcp_stream(host, int(port))
            await boom.send_all(b"GET /BOOM HTTP/1.1\r\nHost: x\r\n\r\n")
            with trio.fail_after(5):
                assert await boom.receive_some(100) == b""  # that connection is closed
            assert (await http.get(f"{url}/ok")).status_code == 200
        shutdown.set()
    assert "failed and was closed" in caplog.text
    assert "planted failure" in caplog.text


async def _ok() -> tuple[int, object]:
    return 200, {}


async def test_an_http11_answer_before_the_body_does_not_break_the_next_request() -> None:
    """A listener that answers before the request body has arrived (a 401 from an auth
    check) closes the HTTP/1.1 connection (hypercorn cannot start the next request on it);
    the answer must say ``Connection: close`` so that the client does not send its next
    request on that connection (it used to fail: "Server disconnected without sending a
    response", as in test_client_api under load)."""
    from peekproxy.serving import hypercorn_config, start_listener

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        status = 401 if scope["path"] == "/auth" else 200  # /auth answers before reading
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})

    body_sent = trio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"{"
        await trio.sleep(0.3)  # the answer comes before the rest of the body
        yield b"}"
        body_sent.set()

    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        url = await start_listener(
            nursery,
            "test",
            app,
            hypercorn_config("127.0.0.1:0", grace=0.1, access_log=False),
            shutdown,
        )
        async with httpx.AsyncClient(http1=True, timeout=10) as http:
            early = await http.post(f"{url}/auth", content=slow_body())
            assert early.status_code == 401
            assert early.headers.get("connection") == "close"
            assert body_sent.is_set()
            after = await http.get(f"{url}/ok")  # on a new connection
            assert after.status_code == 200
        shutdown.set()


def test_guards_refuse_an_untested_hypercorn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guards, "version", lambda name: "0.19.0")
    with pytest.raises(RuntimeError, match=r"hypercorn 0\.19\.0 is installed"):
        install_guards()


async def test_debug_logs_hold_no_token_and_odd_methods_make_no_series(
    server_dir: Path, spawn: Spawn
) -> None:
    """At log level DEBUG an HTTP/2 request's headers are not logged (hpack logs each
    decoded header at DEBUG, Authorization included), nor is a query's access token; and
    made-up methods are counted as ``other``, so no request creates metric series at will."""
    daemon = await spawn(write_config(server_dir), env={"PEEKPROXY_LOGGING__LEVEL": "DEBUG"})
    secret = "s3cr3t-" + os.urandom(8).hex()
    async with httpx.AsyncClient(http1=False, http2=True, timeout=20) as http:  # h2c
        answer = await http.get(
            f"{daemon.client}/_peekproxy/v1/sync",
            params={"user_id": "@a:b", "device_id": "D", "access_token": secret},
            headers={"Authorization": f"Bearer {secret}"},
        )
        assert answer.http_version == "HTTP/2" and answer.status_code in (401, 403)
        for method in ("ZZMETHOD1", "ZZMETHOD2"):
            odd = await http.request(method, f"{daemon.client}/health")
            assert odd.status_code == 405
        metrics = (await http.get(f"{daemon.metrics}/metrics")).text
    assert secret not in daemon.log
    assert "ZZMETHOD" not in metrics and 'method="other"' in metrics


async def test_a_protocol_error_is_one_log_line_not_a_traceback(
    server_dir: Path, spawn: Spawn
) -> None:
    """A WebSocket upgrade followed at once by more bytes makes hypercorn break h11's state
    (module docstring of serving/guards.py): each such request is one warning line, so a client
    cannot flood the log with tracebacks."""
    daemon = await spawn(write_config(server_dir))
    host, port = daemon.client.removeprefix("http://").rsplit(":", 1)
    request = (
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        b"\x81\x05hello"
    )
    for _ in range(3):
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(request)
        with trio.move_on_after(5):
            while await stream.receive_some(65536):
                pass
        await stream.aclose()
    await daemon.wait_for_log(rb"(?s)(protocol error.*){3}")
    assert "Traceback" not in daemon.log and "Error in ASGI Framework" not in daemon.log
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{daemon.client}/health")).status_code == 200

"""The real daemon process: key server over TLS, errors, restart, schema guard, shutdown."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import ssl
import time
from pathlib import Path

import httpx
import pytest
import trio
import trio.lowlevel
from signedjson.key import decode_verify_key_bytes, generate_signing_key
from signedjson.sign import verify_signed_json
from unpaddedbase64 import decode_base64

from peekproxy.core.xmatrix import authorization_header
from peekproxy.federation.signing_key import server_key_document
from tests.conftest import Spawn
from tests.support import DaemonProcess, JsonApp, serve_app, write_config


def _client(ca: Path | None = None) -> httpx.AsyncClient:
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca else True
    return httpx.AsyncClient(verify=verify, timeout=10)


async def test_key_document_over_tls_verifies(
    server_dir: Path, tls_files: tuple[Path, Path, Path], spawn: Spawn
) -> None:
    cert, key, ca = tls_files
    config = write_config(
        server_dir,
        server_name="peek.test:8448",
        extra={
            "listeners.federation": f'tls_certificate_file = "{cert}"\n'
            f'tls_private_key_file = "{key}"'
        },
    )
    daemon = await spawn(config)
    assert daemon.federation.startswith("https://")
    port = daemon.federation.rsplit(":", 1)[1]
    before_ms = int(time.time() * 1000)
    async with _client(ca) as http:
        # The certificate is for "localhost": TLS name checked, not just encryption.
        response = await http.get(f"https://localhost:{port}/_matrix/key/v2/server")
        version = await http.get(f"https://localhost:{port}/_matrix/federation/v1/version")
    assert response.status_code == 200
    document = response.json()
    assert document["server_name"] == "peek.test:8448"
    assert document["valid_until_ts"] >= before_ms + 86_400_000 - 60_000
    assert document["old_verify_keys"] == {}
    [(key_id, entry)] = document["verify_keys"].items()
    assert key_id == daemon.key
    verify_key = decode_verify_key_bytes(key_id, decode_base64(entry["key"]))
    verify_signed_json(document, "peek.test:8448", verify_key)  # raises if the signature is bad
    assert version.json()["server"]["name"] == "peekproxy"


async def test_unknown_paths_and_methods_get_matrix_errors(server_dir: Path, spawn: Spawn) -> None:
    daemon = await spawn(write_config(server_dir))
    async with _client() as http:
        health = await http.get(f"{daemon.client}/health")
        ready = await http.get(f"{daemon.client}/ready")
        missing_client = await http.get(f"{daemon.client}/_matrix/client/v3/nothing")
        missing_fed = await http.get(f"{daemon.federation}/_matrix/federation/v1/nothing")
        wrong_method = await http.post(f"{daemon.federation}/_matrix/key/v2/server", json={})
        metrics = await http.get(f"{daemon.metrics}/metrics")
        missing_metrics = await http.get(f"{daemon.metrics}/other")
        post_metrics = await http.post(f"{daemon.metrics}/metrics")
        trailing_slash = await http.get(f"{daemon.client}/health/")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert post_metrics.status_code == 405
    for response in (missing_client, missing_fed, missing_metrics, trailing_slash):
        assert response.status_code == 404
        assert response.json()["errcode"] == "M_UNRECOGNIZED"
        assert response.json()["error"]
    assert wrong_method.status_code == 405
    assert wrong_method.json()["errcode"] == "M_UNRECOGNIZED"
    assert metrics.status_code == 200
    assert (
        'peekproxy_http_requests_total{code="200",listener="client",method="GET"}' in metrics.text
    )


async def test_restart_keeps_key_and_database(server_dir: Path, spawn: Spawn) -> None:
    config = write_config(server_dir)
    first = await spawn(config)
    async with _client() as http:
        key_before = (await http.get(f"{first.federation}/_matrix/key/v2/server")).json()
    first.signal(signal.SIGTERM)
    assert await first.wait() == 0
    db = server_dir / "data" / "peekproxy.db"
    created = dict(sqlite3.connect(db).execute("SELECT key, value FROM server_info").fetchall())

    second = await spawn(config)
    async with _client() as http:
        key_after = (await http.get(f"{second.federation}/_matrix/key/v2/server")).json()
    second.signal(signal.SIGTERM)
    assert await second.wait() == 0
    assert key_after["verify_keys"] == key_before["verify_keys"]
    assert dict(sqlite3.connect(db).execute("SELECT key, value FROM server_info")) == created
    assert created["server_name"] == "localhost:8448"


async def test_newer_schema_is_refused(server_dir: Path, spawn: Spawn) -> None:
    config = write_config(server_dir)
    (server_dir / "data").mkdir()
    with sqlite3.connect(server_dir / "data" / "peekproxy.db") as conn:
        conn.execute("PRAGMA user_version = 999")
    daemon = await spawn(config, expect_ready=False)
    with trio.fail_after(30):
        assert await daemon.wait() == 1
        await daemon.wait_for_log(rb"stopped|version")
    assert "schema version 999" in daemon.log
    assert "newer peekproxy" in daemon.log
    assert "Traceback" not in daemon.log


async def test_other_server_names_database_is_refused(server_dir: Path, spawn: Spawn) -> None:
    first = await spawn(write_config(server_dir, server_name="one.test"))
    first.signal()
    assert await first.wait() == 0
    second = await spawn(write_config(server_dir, server_name="two.test"), expect_ready=False)
    with trio.fail_after(30):
        assert await second.wait() == 1
    assert "belongs to server name 'one.test'" in second.log


async def test_busy_port_names_the_listener(server_dir: Path, spawn: Spawn) -> None:
    with trio.socket.socket() as busy:
        await busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(server_dir, binds={"client": f"127.0.0.1:{port}"})
        daemon = await spawn(config, expect_ready=False)
        with trio.fail_after(30):
            assert await daemon.wait() == 1
    assert (
        f"listeners.client.bind: cannot listen on 127.0.0.1:{port}: Address already in use"
        in daemon.log
    )
    assert "Traceback" not in daemon.log and "stopped" not in daemon.log


@pytest.mark.slow
async def test_a_failed_start_leaves_the_database_unbound(server_dir: Path, spawn: Spawn) -> None:
    """A start that fails (port in use) must not bind the database to its server name, or the
    corrected config (another server name, a free port) would be refused (#10 item 18)."""
    with trio.socket.socket() as busy:
        await busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        wrong = write_config(
            server_dir, server_name="typo.test", binds={"client": f"127.0.0.1:{port}"}
        )
        failed = await spawn(wrong, expect_ready=False)
        with trio.fail_after(30):
            assert await failed.wait() == 1
    assert "Address already in use" in failed.log
    fixed = await spawn(write_config(server_dir, server_name="right.test"))
    async with _client() as http:
        assert (await http.get(f"{fixed.client}/health")).status_code == 200
    fixed.signal()
    assert await fixed.wait() == 0
    db = server_dir / "data" / "peekproxy.db"
    info = dict(sqlite3.connect(db).execute("SELECT key, value FROM server_info").fetchall())
    assert info["server_name"] == "right.test"
    # A start that succeeded binds it: from then on the first name is refused.
    again = await spawn(write_config(server_dir, server_name="typo.test"), expect_ready=False)
    with trio.fail_after(30):
        assert await again.wait() == 1
    assert "belongs to server name 'right.test'" in again.log


class _GatedKeyServer:
    """A remote server whose key document is held back until ``release`` is set, so a
    federation request that needs its key stays in flight inside peekproxy."""

    def __init__(self) -> None:
        self.signing_key = generate_signing_key("gate")
        self.server_name = ""
        self.asked = trio.Event()
        self.release = trio.Event()

    async def key_document(self, scope: object, body: bytes) -> tuple[int, object]:
        self.asked.set()
        await self.release.wait()
        return 200, server_key_document(
            self.server_name,
            self.signing_key,
            now_ms=int(time.time() * 1000),
            valid_for_ms=3_600_000,
        )


async def _start_gated_request(
    server_dir: Path, tls_files: tuple[Path, Path, Path], spawn: Spawn, nursery: trio.Nursery
) -> tuple[DaemonProcess, _GatedKeyServer, list[httpx.Response]]:
    cert, key, ca = tls_files
    remote = _GatedKeyServer()
    app = JsonApp({("GET", "/_matrix/key/v2/server"): remote.key_document})
    url = await serve_app(nursery, app, tls=(cert, key))
    remote.server_name = f"localhost:{url.rsplit(':', 1)[1]}"
    config = write_config(server_dir)
    daemon = await spawn(
        config,
        env={
            "PEEKPROXY_FEDERATION__IP_RANGE_WHITELIST": '["127.0.0.0/8"]',
            "PEEKPROXY_FEDERATION__TLS_CA_FILE": str(ca),
        },
    )
    target = "/_matrix/federation/v1/query/directory?room_alias=%23a%3Alocalhost%3A8448"
    header = authorization_header(
        remote.signing_key,
        origin=remote.server_name,
        destination="localhost:8448",
        method="GET",
        uri=target,
    )
    responses: list[httpx.Response] = []

    async def ask() -> None:
        async with _client() as http:
            with contextlib.suppress(httpx.TransportError):
                responses.append(
                    await http.get(daemon.federation + target, headers={"Authorization": header})
                )

    nursery.start_soon(ask)
    with trio.fail_after(10):
        await remote.asked.wait()  # peekproxy is now fetching the key: the request is in flight
    return daemon, remote, responses


async def test_sigterm_finishes_a_request_in_flight(
    server_dir: Path, tls_files: tuple[Path, Path, Path], spawn: Spawn
) -> None:
    async with trio.open_nursery() as nursery:
        daemon, remote, responses = await _start_gated_request(
            server_dir, tls_files, spawn, nursery
        )
        started = trio.current_time()
        daemon.signal(signal.SIGTERM)
        await daemon.wait_for_log(rb"SIGTERM received")
        remote.release.set()
        with trio.fail_after(5):
            assert await daemon.wait() == 0
        assert trio.current_time() - started < 5
        nursery.cancel_scope.cancel()
    # The request finished after SIGTERM: verified (key fetched) and answered.
    [response] = responses
    assert response.status_code == 404
    assert response.json()["errcode"] == "M_NOT_FOUND"


async def test_sigterm_cuts_a_stuck_request_at_the_deadline(
    server_dir: Path, tls_files: tuple[Path, Path, Path], spawn: Spawn
) -> None:
    async with trio.open_nursery() as nursery:
        daemon, _remote, responses = await _start_gated_request(
            server_dir, tls_files, spawn, nursery
        )
        started = trio.current_time()
        daemon.signal(signal.SIGTERM)
        with trio.fail_after(5):
            assert await daemon.wait() == 0
        elapsed = trio.current_time() - started
        assert 2.5 < elapsed < 5  # waited for the 3 s grace, then stopped
        nursery.cancel_scope.cancel()
    assert responses == []


async def test_a_second_sigterm_stops_at_once(
    server_dir: Path, tls_files: tuple[Path, Path, Path], spawn: Spawn
) -> None:
    """The drain waits up to 3 s for a stuck request; a second SIGTERM does not wait."""
    async with trio.open_nursery() as nursery:
        daemon, _remote, responses = await _start_gated_request(
            server_dir, tls_files, spawn, nursery
        )
        daemon.signal(signal.SIGTERM)
        await daemon.wait_for_log(rb"SIGTERM received")
        started = trio.current_time()
        daemon.signal(signal.SIGTERM)
        with trio.fail_after(5):
            assert await daemon.wait() == 0
        assert trio.current_time() - started < 1.5
        nursery.cancel_scope.cancel()
    assert "second SIGTERM: stopping now" in daemon.log
    assert responses == []


async def test_sighup_during_the_drain_does_no_harm(
    server_dir: Path, tls_files: tuple[Path, Path, Path], spawn: Spawn
) -> None:
    """A SIGHUP (logrotate, a reload) while the daemon drains neither reloads nor ends it:
    the request in flight still finishes and the exit is 0."""
    async with trio.open_nursery() as nursery:
        daemon, remote, responses = await _start_gated_request(
            server_dir, tls_files, spawn, nursery
        )
        daemon.signal(signal.SIGTERM)
        await daemon.wait_for_log(rb"SIGTERM received")
        daemon.signal(signal.SIGHUP)
        await daemon.wait_for_log(rb"SIGHUP ignored: shutting down")
        remote.release.set()
        with trio.fail_after(5):
            assert await daemon.wait() == 0
        nursery.cancel_scope.cancel()
    [response] = responses
    assert response.status_code == 404
    assert "reloading" not in daemon.log


async def test_sigint_and_idle_connections_still_exit_quickly(
    server_dir: Path, spawn: Spawn
) -> None:
    daemon = await spawn(write_config(server_dir))
    host, port = daemon.federation.removeprefix("http://").rsplit(":", 1)
    # An idle keep-alive connection and one that never finishes its request.
    idle = await trio.open_tcp_stream(host, int(port))
    stuck = await trio.open_tcp_stream(host, int(port))
    await stuck.send_all(b"PUT /_matrix/federation/v1/send/1 HTTP/1.1\r\nHost: x\r\n")
    started = trio.current_time()
    daemon.signal(signal.SIGINT)
    with trio.fail_after(5):
        assert await daemon.wait() == 0
    assert trio.current_time() - started < 5
    await idle.aclose()
    await stuck.aclose()


async def test_one_daemon_per_database(server_dir: Path, spawn: Spawn) -> None:
    config = write_config(server_dir)
    first = await spawn(config)
    second = await spawn(config, expect_ready=False)
    with trio.fail_after(30):
        assert await second.wait() == 1
    assert "is in use by another peekproxy" in second.log
    assert "Traceback" not in second.log
    first.signal()
    assert await first.wait() == 0


def _ignores_sighup(pid: int) -> bool:
    """Whether process ``pid`` ignores SIGHUP (the ``SigIgn`` mask of /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask, 16) & (1 << (signal.SIGHUP - 1)))


async def test_sighup_at_start_up_and_at_the_end_of_a_shutdown_never_ends_it(
    server_dir: Path, spawn: Spawn
) -> None:
    """Before the daemon's signal receiver runs and after it closes, SIGHUP (a logrotate
    ``kill -HUP`` at the wrong moment) must not end the process by its default action."""
    daemon = await spawn(write_config(server_dir), expect_ready=False)
    pid = daemon.process.pid
    with trio.fail_after(30):
        while not _ignores_sighup(pid):  # noqa: ASYNC110 -- polls /proc: no event to wait on
            await trio.sleep(0.005)
        while b"ready:" not in daemon.log.encode():  # a SIGHUP storm through the start-up
            daemon.signal(signal.SIGHUP)
            await trio.sleep(0.01)
    await daemon.wait_for_log(rb"ready:")
    daemon.signal(signal.SIGTERM)
    with trio.fail_after(10):  # and through the whole shutdown
        while daemon.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                daemon.signal(signal.SIGHUP)
            await trio.sleep(0.005)
    assert await daemon.wait() == 0
    assert "peekproxy stopped" in daemon.log

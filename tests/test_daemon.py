"""The real daemon process: key server over TLS, errors, restart, schema guard, shutdown."""

from __future__ import annotations

import signal
import sqlite3
import ssl
import time
from pathlib import Path

import httpx
import trio
import trio.lowlevel
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import verify_signed_json
from unpaddedbase64 import decode_base64

from tests.conftest import Spawn
from tests.support import write_config


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
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 200
    for response in (missing_client, missing_fed, missing_metrics):
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
        config = write_config(server_dir)
        text = config.read_text().replace(
            "[listeners.client]\n# Client-facing endpoints (/health, /ready, and the peek API). "
            'Keep it behind your reverse proxy.\nbind = "127.0.0.1:0"',
            f'[listeners.client]\nbind = "127.0.0.1:{port}"',
        )
        assert f":{port}" in text
        config.write_text(text)
        daemon = await spawn(config, expect_ready=False)
        with trio.fail_after(30):
            assert await daemon.wait() == 1
    assert f"listeners.client.bind: cannot listen on 127.0.0.1:{port}" in daemon.log


async def test_sigterm_exits_zero_with_a_request_in_flight(server_dir: Path, spawn: Spawn) -> None:
    daemon = await spawn(write_config(server_dir))
    host, port = daemon.client.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    # Half a request: the daemon has accepted it and is reading it when SIGTERM arrives.
    await stream.send_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
    await trio.lowlevel.checkpoint()  # let the bytes leave; the daemon reads them at its own pace
    started = trio.current_time()
    daemon.signal(signal.SIGTERM)
    await daemon.wait_for_log(rb"SIGTERM received")
    await stream.send_all(b"\r\n")  # finish the in-flight request
    reply = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200"), reply
        assert await daemon.wait() == 0
    assert trio.current_time() - started < 5
    await stream.aclose()


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


async def test_systemd_unit_settings_run_the_daemon(tmp_path: Path, spawn: Spawn) -> None:
    """Run with the environment the shipped unit sets (config, state dir, credential key)."""
    unit = (Path(__file__).parent.parent / "systemd" / "peekproxy.service").read_text()
    etc, state, credentials = tmp_path / "etc", tmp_path / "state", tmp_path / "credentials"
    for directory in (etc, state, credentials):
        directory.mkdir()
    from peekproxy.federation.signing_key import write_new_signing_key

    write_new_signing_key(credentials / "signing.key")
    config = write_config(etc)
    config.chmod(0o444)
    env: dict[str, str] = {}
    for line in unit.splitlines():
        if line.startswith("Environment="):
            name, value = line.removeprefix("Environment=").split("=", 1)
            env[name] = (
                value.replace("/etc/peekproxy/config.toml", str(config))
                .replace("/var/lib/peekproxy", str(state))
                .replace("%d", str(credentials))
            )
    assert set(env) >= {"PEEKPROXY_CONFIG", "PEEKPROXY_SERVER__SIGNING_KEY_FILE"}
    daemon = await spawn(config, env=env)
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait() == 0
    assert (state / "peekproxy.db").exists()
    assert not (etc / "data").exists()

"""Logs an admin can search (issue 15): the documented fields (``room_id``, ``peek_id``,
``origin``, ``destination``, ``user_id``, ``device_id``) in JSON and text lines, no
timestamps under journald, one access-log line per request, and never a token, secret or
key in the log, even at DEBUG."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio
import trustme

from peekproxy.logs import (
    JsonFormatter,
    TextFormatter,
    bind_log_fields,
    log_fields,
    setup_logging,
)
from tests.conftest import Spawn
from tests.peek_world import SECRET, TESTBED, build_world
from tests.support import write_config
from tests.synapse import Synapse

# -- formatting and binding (in process) --------------------------------------------------------


def _record(msg: str, *args: Any, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("peekproxy.peeks", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """A buffer for what the daemon's logging set-up writes (:func:`_setup`); the root
    logger restored after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield io.StringIO()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def _setup(buffer: io.StringIO, level: str, fmt: Any) -> None:
    """:func:`setup_logging`, its handler writing to ``buffer`` instead of stderr (pytest
    swaps ``sys.stderr`` between a test's phases)."""
    setup_logging(level, fmt)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)


def test_json_lines_carry_the_fields_as_top_level_keys() -> None:
    record = _record("peeking %s", "!r:x", room_id="!r:x", destination="x", peek_id=None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "peeking !r:x" and entry["level"] == "INFO"
    assert entry["room_id"] == "!r:x" and entry["destination"] == "x"
    assert "peek_id" not in entry and "user_id" not in entry  # None or absent: left out


def test_text_lines_end_with_the_fields_the_message_lacks() -> None:
    formatter = TextFormatter("%(levelname)s %(name)s: %(message)s")
    record = _record("peeking %s", "!r:x", room_id="!r:x", destination="x.test", peek_id="P1")
    assert formatter.format(record) == (
        "INFO peekproxy.peeks: peeking !r:x peek_id=P1 destination=x.test"
    )
    # Shown only as a whole word: "D" is not shown by "DEBUG".
    assert formatter.format(_record("DEBUG of @u:x", user_id="@u:x", device_id="D")).endswith(
        "DEBUG of @u:x device_id=D"
    )
    plain = _record("nothing known")
    assert formatter.format(plain) == "INFO peekproxy.peeks: nothing known"


async def test_fields_bound_to_a_task_and_its_later_children(log_output: io.StringIO) -> None:
    _setup(log_output, "DEBUG", "json")
    log = logging.getLogger("peekproxy.test")

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in log_output.getvalue().splitlines()]

    async def child(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        log.info("child")
        bind_log_fields(fresh=True, room_id="!c:x")  # its own, not the parent's
        log.info("child again")
        task_status.started()

    async def request() -> None:
        bind_log_fields(user_id="@u:x", device_id="D")
        with log_fields(room_id="!r:x", destination="x"):
            log.info("inside", extra={"destination": "y"})  # extra= wins
        log.info("after")
        async with trio.open_nursery() as nursery:
            await nursery.start(child)
        log.info("parent")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
    log.info("outside")
    with pytest.raises(ValueError, match="not log fields"):
        bind_log_fields(token="x")
    fields = [
        {k: v for k, v in line.items() if k not in ("ts", "level", "logger")} for line in lines()
    ]
    assert fields == [
        {"msg": "inside", "room_id": "!r:x", "destination": "y", "user_id": "@u:x"}
        | {"device_id": "D"},
        {"msg": "after", "user_id": "@u:x", "device_id": "D"},
        {"msg": "child", "user_id": "@u:x", "device_id": "D"},
        {"msg": "child again", "room_id": "!c:x"},
        {"msg": "parent", "user_id": "@u:x", "device_id": "D"},
        {"msg": "outside"},
    ]


def test_no_timestamps_under_journald(
    log_output: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    _setup(log_output, "INFO", "text")
    logging.getLogger("peekproxy.test").info("hello %s", "!r:x", extra={"room_id": "!r:x"})
    monkeypatch.delenv("JOURNAL_STREAM")
    _setup(log_output, "INFO", "text")
    logging.getLogger("peekproxy.test").info("hello", extra={"origin": "o.test"})
    journald, plain = log_output.getvalue().splitlines()
    assert journald == "INFO peekproxy.test: hello !r:x"
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO peekproxy.test: hello origin=o.test", plain
    )


# -- one access-log line per request (a real daemon) --------------------------------------------


ACCESS = re.compile(r'peekproxy\.access: \S+ "(\S+) (\S+) HTTP/([\d.]+)" (\S+) ')


async def _health_read_then_close(base: str) -> None:
    """As curl does: one request, the answer read, the connection closed at once."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    received = b""
    while not received.endswith(b'{"status":"ok"}'):
        chunk = await stream.receive_some(4096)
        assert chunk, received
        received += chunk
    await stream.aclose()


async def test_one_access_line_per_request(server_dir: Path, spawn: Spawn) -> None:
    (server_dir / "delegation.secret").write_text("s3cret\n")
    config = write_config(
        server_dir, extra={"delegation": 'shared_secret_file = "delegation.secret"'}
    )
    daemon = await spawn(config, env={"JOURNAL_STREAM": "8:4242"})
    secret = {"Authorization": "Bearer s3cret"}
    base = daemon.client
    for _ in range(3):  # a new connection each, closed once the answer is read
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{base}/health")).status_code == 200
    await _health_read_then_close(base)
    async with httpx.AsyncClient(http1=False, http2=True) as http:  # h2c
        answer = await http.get(f"{base}/health")
        assert answer.status_code == 200 and answer.http_version == "HTTP/2"
    async with httpx.AsyncClient(base_url=base) as http:
        assert (await http.get("/ready")).status_code == 200
        assert (await http.get("/nope")).status_code == 404
        assert (await http.post("/health")).status_code == 405
        assert (await http.get("/_peekproxy/v1/sync")).status_code == 401
        status = await http.get("/_peekproxy/v1/admin/subscriptions", headers=secret)
        assert status.status_code == 200 and status.json()["subscriptions"] == []
        # A long-poll the client gives up on: logged once, without a status (the client
        # never got one), also when peekproxy answers it later.
        device = {"user_id": "@u:x", "device_id": "D"}
        first = await http.get("/_peekproxy/v1/sync", params=device, headers=secret)
        since = first.json()["next_batch"]
        with pytest.raises(httpx.ReadTimeout):
            await http.get(
                "/_peekproxy/v1/sync",
                params=device | {"since": since, "timeout": "1000"},
                headers=secret,
                timeout=0.3,
            )
    daemon.signal(signal.SIGTERM)  # in-flight requests finish first (the graceful drain)
    assert await daemon.wait() == 0
    lines = [line for line in daemon.log.splitlines() if "peekproxy.access" in line]
    seen = [ACCESS.search(line) for line in lines]
    assert all(seen), lines
    requests = [m.groups() for m in seen if m is not None]
    assert sorted(requests) == sorted(
        [("GET", "/health", "1.1", "200")] * 4
        + [
            ("GET", "/health", "2", "200"),
            ("GET", "/ready", "1.1", "200"),
            ("GET", "/nope", "1.1", "404"),
            ("POST", "/health", "1.1", "405"),
            ("GET", "/_peekproxy/v1/sync", "1.1", "401"),
            ("GET", "/_peekproxy/v1/admin/subscriptions", "1.1", "200"),
            ("GET", "/_peekproxy/v1/sync", "1.1", "200"),
            ("GET", "/_peekproxy/v1/sync", "1.1", "-"),
        ]
    ), lines
    # Under journald (JOURNAL_STREAM set) no line carries a timestamp: journald adds its own.
    assert all(line.startswith(("INFO ", "WARNING ")) for line in daemon.log.splitlines()), (
        daemon.log
    )

    # Without a delegation secret the admin endpoint does not exist.
    plain = server_dir / "plain"
    plain.mkdir()
    (plain / "signing.key").write_bytes((server_dir / "signing.key").read_bytes())
    other = await spawn(write_config(plain))
    async with httpx.AsyncClient(base_url=other.client) as http:
        absent = await http.get("/_peekproxy/v1/admin/subscriptions", headers=secret)
    assert absent.status_code == 404 and absent.json()["errcode"] == "M_UNRECOGNIZED"


# -- nothing secret in the log, and the fields where expected (a real daemon at DEBUG) ----------


async def test_no_token_secret_or_key_in_a_debug_json_log(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    world = await build_world(
        nursery,
        tls_ca,
        tmp_path,
        spawn,
        peeks_env={
            "PEEKPROXY_UPSTREAM__HOMESERVER_URL": synapse.client,
            "PEEKPROXY_LOGGING__LEVEL": "DEBUG",
            "PEEKPROXY_LOGGING__FORMAT": "json",
        },
    )
    world.testbed.renewal_interval_ms = 2_000  # renewals (logged at DEBUG) every second
    token = synapse.register("log-user")
    wrong_token = "syt_wrong_token_never_logged"
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=synapse.client) as http:
        me = (await http.get("/_matrix/client/v3/account/whoami", headers=auth)).json()
    fronted, direct = world.create_room("10"), world.create_room("11")
    async with httpx.AsyncClient(base_url=world.daemon.client, timeout=60) as http:
        # Front mode: the access token in the header, then in the query string.
        peeked = await http.post(
            f"/_matrix/client/v3/peek/{quote(fronted, safe='')}",
            params={"server_name": TESTBED},
            json={},
            headers=auth,
        )
        assert peeked.status_code == 200, peeked.text
        synced = await http.get(
            "/_matrix/client/v3/sync", params={"access_token": token, "timeout": "0"}
        )
        assert synced.status_code == 200, synced.text
        refused = await http.get(
            "/_matrix/client/v3/sync", params={"access_token": wrong_token, "timeout": "0"}
        )
        assert refused.status_code == 401
        # The delegation API (the secret in the header), and the admin endpoint.
        assert (await world.peek(direct, hints=[TESTBED])).status_code == 200
        await world.sync()
        status = await http.get(
            "/_peekproxy/v1/admin/subscriptions", headers={"Authorization": f"Bearer {SECRET}"}
        )
        assert status.status_code == 200
    # A /send from the testbed.
    await world.wait_delivered(world.send(fronted, "hello"))
    await world.daemon.wait_for_log(rb'"msg": "renewed peek ')
    world.daemon.signal(signal.SIGTERM)
    assert await world.daemon.wait() == 0

    log = world.daemon.log
    seed = (world.config.parent / "signing.key").read_text().split()[2]
    for secret in (token, wrong_token, SECRET, seed):
        assert secret not in log
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert {"ts", "level", "logger", "msg"} <= set(entries[0])

    def having(**fields: str) -> list[dict[str, Any]]:
        return [e for e in entries if all(e.get(k) == v for k, v in fields.items())]

    # The front-mode peek: who asked, which room, through which server and peek.
    [started] = [
        e
        for e in having(user_id=me["user_id"], device_id=me["device_id"], room_id=fronted)
        if e["msg"].startswith("peeking ")
    ]
    assert started["destination"] == TESTBED and started["peek_id"] in started["msg"]
    # The delegation API's device.
    assert having(user_id="@alice:peekproxy.test", device_id="D1", room_id=direct)
    # The /send: its origin, and the room it was for.
    assert having(origin=TESTBED, logger="peekproxy.peeks")
    # A renewal in the room's own task: the room, the server and the peek; no device.
    renewals = [e for e in entries if e["msg"].startswith("renewed peek ")]
    assert renewals and all(
        e["room_id"] in (fronted, direct)
        and e["destination"] == TESTBED
        and "peek_id" in e
        and "user_id" not in e
        for e in renewals
    )
    # The access log: JSON too.
    assert any(e["logger"] == "peekproxy.access" and "/sync" in e["msg"] for e in entries)

"""The daemon's lifecycle, on a spawned process over real sockets (issue 15 part A): the
sd_notify sequence, SIGHUP reloads (broken configs, rate limits, the delegation secret, the
TLS certificate) and the SIGTERM drain that answers every open ``/sync`` long-poll."""

from __future__ import annotations

import re
import signal
import ssl
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio
import trustme

from tests.conftest import Spawn
from tests.front_support import Account, front_world, peek, sync
from tests.lifecycle_support import (
    NotifySocket,
    log_count,
    port_of,
    wait_log_count,
    wait_requests_read,
)
from tests.peek_world import SECRET, TESTBED, PeekWorld, build_world
from tests.support import issue_cert, write_config
from tests.synapse import Synapse

RELOADED = rb"config reloaded: "
REFUSED = rb"reload refused, the running settings stay"


async def test_sd_notify_sequence(server_dir: Path, spawn: Spawn) -> None:
    """READY=1 once the listeners answer; SIGHUP: RELOADING=1 with MONOTONIC_USEC, then
    READY=1; SIGTERM: STOPPING=1, exit 0."""
    async with NotifySocket(server_dir) as notify:
        daemon = await spawn(write_config(server_dir), env=notify.env)
        assert await notify.next() == "READY=1"
        async with httpx.AsyncClient(timeout=1) as http:  # answers at once after READY
            assert (await http.get(f"{daemon.client}/health")).status_code == 200
            assert (await http.get(f"{daemon.federation}/_matrix/key/v2/server")).is_success

        before_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        daemon.signal(signal.SIGHUP)
        reloading = await notify.next()
        after_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        fields = dict(line.split("=", 1) for line in reloading.splitlines())
        assert fields["RELOADING"] == "1"
        assert before_us <= int(fields["MONOTONIC_USEC"]) <= after_us
        ready = await notify.next()
        assert ready.splitlines()[0] == "READY=1"
        assert "STATUS=reloaded: nothing changed" in ready.splitlines()

        daemon.signal(signal.SIGTERM)
        assert await notify.next() == "STOPPING=1"
        with trio.fail_after(5):
            assert await daemon.wait() == 0
    assert daemon.process.returncode == 0  # SIGHUP did not end it (exit by signal before)


def _set(config: Path, key: str, value: str) -> None:
    """Set ``key = value`` in the config file (the generated config has each of the keys
    set here once)."""
    text, count = re.subn(rf"^{key} = .*$", f"{key} = {value}", config.read_text(), flags=re.M)
    assert count == 1, key
    config.write_text(text)


async def _peeks_until_limited(world: PeekWorld, room_id: str, user: str) -> int:
    """How many peeks ``user`` starts before a 429 (at most 20)."""
    async with httpx.AsyncClient(timeout=30) as http:
        for done in range(20):
            response = await http.post(
                f"{world.daemon.client}/_peekproxy/v1/peek/{quote(room_id, safe='')}",
                params={"user_id": user, "device_id": "D", "server_name": TESTBED},
                json={},
                headers={"Authorization": f"Bearer {SECRET}"},
            )
            if response.status_code == 429:
                assert response.json()["errcode"] == "M_LIMIT_EXCEEDED"
                return done
            assert response.status_code == 200, response.text
    return 20


async def _reload(world: PeekWorld, pattern: bytes) -> None:
    count = log_count(world.daemon, pattern)
    world.daemon.signal(signal.SIGHUP)
    await wait_log_count(world.daemon, pattern, count + 1)


async def test_sighup_reloads_limits_and_secret_and_keeps_a_broken_config_out(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    world = await build_world(nursery, tls_ca, tmp_path, spawn)
    config = world.config
    _set(config, "rate_limit_per_second", "0.001")
    _set(config, "rate_limit_burst", "2")
    world.daemon.signal(signal.SIGTERM)  # start with these limits
    assert await world.daemon.wait() == 0
    world.daemon = await spawn(config, env=world.env)
    room_id = world.create_room("10")
    assert await _peeks_until_limited(world, room_id, "@a:peekproxy.test") == 2

    # Not TOML: the file is named, the old limits stay.
    good = config.read_text()
    config.write_text(good + "\n[peeks\n")
    await _reload(world, REFUSED)
    assert re.search(rb"reload refused.*config\.toml: invalid TOML", world.daemon.stderr)
    assert await _peeks_until_limited(world, room_id, "@b:peekproxy.test") == 2
    # An invalid value: the key is named, nothing of the file is applied.
    config.write_text(good)
    _set(config, "rate_limit_burst", "0")
    _set(config, "max_peeks_per_device", "1")
    await _reload(world, REFUSED)
    assert re.search(rb"ERROR .*reload refused.*peeks\.rate_limit_burst: ", world.daemon.stderr)
    assert await _peeks_until_limited(world, room_id, "@c:peekproxy.test") == 2

    # A good config: the new burst applies at once, without a restart; a key that cannot
    # change live is named once.
    config.write_text(good)
    _set(config, "rate_limit_burst", "5")
    _set(config, "sync_section", '"peeking"')
    await _reload(world, RELOADED)
    assert re.search(rb"config reloaded: .*peeks\.rate_limit_burst", world.daemon.stderr)
    assert await _peeks_until_limited(world, room_id, "@d:peekproxy.test") == 5
    warning = rb"WARNING .*peeks\.sync_section changed: takes effect after a restart"
    assert len(re.findall(warning, world.daemon.stderr)) == 1
    await _reload(world, RELOADED)  # the same pending change is not named again
    assert len(re.findall(warning, world.daemon.stderr)) == 1
    assert "peek" in (await world.sync(user="@d:peekproxy.test", device="D"))["rooms"]

    # A new delegation secret: the old one is refused from then on, the new one accepted.
    secret_file = world.config.parent / "delegation.secret"
    secret_file.write_text("a-new-secret\n")
    await _reload(world, RELOADED)
    async with httpx.AsyncClient(base_url=world.daemon.client, timeout=30) as http:
        params = {"user_id": "@d:peekproxy.test", "device_id": "D"}
        old = await http.get("/_peekproxy/v1/sync", params=params, headers=_bearer(SECRET))
        new = await http.get("/_peekproxy/v1/sync", params=params, headers=_bearer("a-new-secret"))
    assert old.status_code == 401 and old.json()["errcode"] == "M_UNKNOWN_TOKEN"
    assert new.status_code == 200 and room_id in new.json()["rooms"]["peek"]
    # An empty secret file is a problem: the running secret stays.
    secret_file.write_text("\n")
    await _reload(world, REFUSED)
    assert re.search(rb"reload refused.*delegation\.shared_secret_file: ", world.daemon.stderr)
    async with httpx.AsyncClient(base_url=world.daemon.client, timeout=30) as http:
        still = await http.get(
            "/_peekproxy/v1/sync", params=params, headers=_bearer("a-new-secret")
        )
    assert still.status_code == 200
    assert "a-new-secret" not in world.daemon.log and SECRET not in world.daemon.log


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def _served_certificate(url: str, ca: trustme.CA) -> bool:
    """Whether a new TLS connection to ``url`` verifies with ``ca`` (and the name
    ``localhost``)."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(url))
    tls = trio.SSLStream(stream, context, server_hostname="localhost")
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError:
        return False
    finally:
        await stream.aclose()
    return True


async def test_sighup_serves_a_replaced_tls_certificate_to_new_connections(
    server_dir: Path, spawn: Spawn
) -> None:
    first_ca, second_ca = trustme.CA(), trustme.CA()
    (server_dir / "a").mkdir()
    (server_dir / "b").mkdir()
    cert, key = issue_cert(first_ca, server_dir / "a", "localhost")
    config = write_config(
        server_dir,
        extra={
            "listeners.federation": f'tls_certificate_file = "{cert}"\n'
            f'tls_private_key_file = "{key}"'
        },
    )
    daemon = await spawn(config)
    assert await _served_certificate(daemon.federation, first_ca)
    assert not await _served_certificate(daemon.federation, second_ca)
    # A connection opened before the reload keeps working on the old certificate.
    context = ssl.create_default_context()
    first_ca.configure_trust(context)
    async with httpx.AsyncClient(verify=context, timeout=10) as before:
        url = f"https://localhost:{port_of(daemon.federation)}/_matrix/key/v2/server"
        assert (await before.get(url)).status_code == 200

        # Replaced in place (as certbot does): same paths, a pair from another CA.
        new_cert, new_key = issue_cert(second_ca, server_dir / "b", "localhost")
        cert.write_bytes(new_cert.read_bytes())
        key.write_bytes(new_key.read_bytes())
        daemon.signal(signal.SIGHUP)
        await daemon.wait_for_log(RELOADED)
        assert await _served_certificate(daemon.federation, second_ca)
        assert not await _served_certificate(daemon.federation, first_ca)
        assert (await before.get(url)).status_code == 200

        # A key that does not match the certificate: refused, the new pair stays in force.
        (server_dir / "c").mkdir()
        _, other_key = issue_cert(first_ca, server_dir / "c", "localhost")
        key.write_bytes(other_key.read_bytes())
        daemon.signal(signal.SIGHUP)
        await daemon.wait_for_log(REFUSED)
    assert re.search(
        rb"ERROR .*reload refused.*listeners\.federation: cannot use tls_", daemon.stderr
    ), daemon.log
    assert await _served_certificate(daemon.federation, second_ca)
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait() == 0


async def _long_polls(
    base_url: str,
    requests: list[tuple[dict[str, str], dict[str, str]]],
    answers: list[tuple[float, httpx.Response | Exception]],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send each (query, headers) ``GET /sync`` on a connection of its own; each answer (or
    transport error) is appended with the time it came."""
    limits = httpx.Limits(max_connections=len(requests) + 10)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as http:

        async def one(params: dict[str, str], headers: dict[str, str], path: str) -> None:
            try:
                response: httpx.Response | Exception = await http.get(
                    path, params=params, headers=headers
                )
            except httpx.TransportError as e:
                response = e
            answers.append((trio.current_time(), response))

        async with trio.open_nursery() as nursery:
            for params, headers in requests:
                path = params.pop("__path", "/_peekproxy/v1/sync")
                nursery.start_soon(one, params, headers, path)
            task_status.started()


async def test_sigterm_answers_every_open_long_poll(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    """100 devices long-poll (timeout 30 s) on real peeks; SIGTERM: every one is answered
    200 with a valid body at once, the daemon exits 0 within 5 s, and each ``next_batch``
    is accepted by the restarted daemon."""
    world = await build_world(nursery, tls_ca, tmp_path, spawn)
    room_id = world.create_room("10")
    users = [f"@u{i}:peekproxy.test" for i in range(100)]
    async with httpx.AsyncClient(base_url=world.daemon.client, timeout=60) as http:
        for user in users:
            response = await http.post(
                f"/_peekproxy/v1/peek/{quote(room_id, safe='')}",
                params={"user_id": user, "device_id": "D", "server_name": TESTBED},
                json={},
                headers=_bearer(SECRET),
            )
            assert response.status_code == 200, response.text
    tokens = {}
    for user in users:
        tokens[user] = (await world.sync(user=user, device="D"))["next_batch"]
    requests = [
        ({"user_id": u, "device_id": "D", "since": tokens[u], "timeout": "30000"}, _bearer(SECRET))
        for u in users
    ]
    answers: list[tuple[float, httpx.Response | Exception]] = []
    async with trio.open_nursery() as polls:
        await polls.start(_long_polls, world.daemon.client, requests, answers)
        await wait_requests_read(port_of(world.daemon.client), len(users))
        assert answers == []  # all of them are waiting
        signalled = trio.current_time()
        world.daemon.signal(signal.SIGTERM)
        with trio.fail_after(5):
            assert await world.daemon.wait() == 0
        exited = trio.current_time() - signalled
    assert exited < 5, exited
    assert len(answers) == len(users)
    slowest = max(at for at, _ in answers) - signalled
    assert slowest < 2, slowest  # answered at once, not after the 3 s grace
    given: dict[str, str] = {}
    failed = [r for _, r in answers if not isinstance(r, httpx.Response)]
    tail = world.daemon.log[world.daemon.log.find("SIGTERM received") - 3000 :]
    assert not failed, f"{len(failed)} failed: {failed[0]!r}\n{tail}"
    for _, answer in answers:
        assert isinstance(answer, httpx.Response)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        assert isinstance(body["next_batch"], str) and body["next_batch"]
        assert body["rooms"]["peek"] == {}  # nothing new
        given[answer.request.url.params["user_id"]] = body["next_batch"]
    assert set(given) == set(users)
    assert "SIGTERM received: shutting down" in world.daemon.log

    world.daemon = await spawn(world.config, env=world.env)
    event_id = world.send(room_id, "after the restart")
    await world.wait_delivered(event_id)
    for user in users[:10]:  # each token is accepted, and goes on from where it was
        body = await world.sync(user=user, device="D", since=given[user])
        events = body["rooms"]["peek"][room_id]["timeline"]["events"]
        assert event_id in [e["event_id"] for e in events]
    for user in users[10:]:
        body = await world.sync(user=user, device="D", since=given[user])
        assert room_id in body["rooms"]["peek"]


async def test_sigterm_answers_front_long_polls(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    """Front mode before the real Synapse: a handful of ``/sync`` long-polls (some peeking a
    testbed room, some not) are answered at once on SIGTERM with an empty sync whose
    ``next_batch`` is the client's own ``since``; the homeserver's long-poll is dropped.
    After a restart each token goes on, and a new peeked event arrives."""
    world = await front_world(synapse, nursery, tls_ca, tmp_path, spawn)
    room_id = world.create_room("10")
    accounts = [Account(synapse, f"drain-{i}-{time.monotonic_ns()}") for i in range(6)]
    for account in accounts[:3]:
        await peek(world, account.token, room_id)
    since = {}
    for account in accounts:
        since[account.user_id] = (await sync(world.daemon.client, account.token))["next_batch"]
    requests = [
        (
            {"__path": "/_matrix/client/v3/sync", "since": since[a.user_id], "timeout": "30000"},
            a.auth,
        )
        for a in accounts
    ]
    answers: list[tuple[float, httpx.Response | Exception]] = []
    async with trio.open_nursery() as polls:
        await polls.start(_long_polls, world.daemon.client, requests, answers)
        await wait_requests_read(port_of(world.daemon.client), len(accounts))
        assert answers == []
        signalled = trio.current_time()
        world.daemon.signal(signal.SIGTERM)
        with trio.move_on_after(5):
            await world.daemon.wait()
        assert world.daemon.process.returncode == 0, world.daemon.log
    assert trio.current_time() - signalled < 5
    assert len(answers) == len(accounts)
    assert max(at for at, _ in answers) - signalled < 2
    by_token = {}
    for _, answer in answers:
        assert isinstance(answer, httpx.Response), f"{answer!r}\n{world.daemon.log}"
        assert answer.status_code == 200, answer.text
        by_token[answer.request.headers["authorization"]] = answer.json()
    for account in accounts:
        assert by_token[f"Bearer {account.token}"] == {"next_batch": since[account.user_id]}

    world.daemon = await spawn(world.config, env=world.env)
    event_id = world.send(room_id, "after the restart")
    await world.wait_delivered(event_id)
    for account in accounts:
        body = await sync(world.daemon.client, account.token, since=since[account.user_id])
        peeked = body.get("rooms", {}).get("peek", {})
        if account in accounts[:3]:
            events = peeked[room_id]["timeline"]["events"]
            assert event_id in [e["event_id"] for e in events]
        else:
            assert room_id not in peeked


async def test_sigterm_with_a_keep_alive_client_exits_without_waiting_the_grace(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    """``peekproxy peek`` keeps one connection and sends its next ``/sync`` on it as soon as
    the drained one is answered. hypercorn left such a connection open, unread, during the
    shutdown: the client waited, and the daemon waited the whole grace (3 s) for it. Now the
    drained answer says ``Connection: close``, the connection is closed, the client stops at
    once and the daemon exits well within the grace."""
    import subprocess
    import sys

    world = await build_world(nursery, tls_ca, tmp_path, spawn)
    room_id = world.create_room("10")
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    cli = await trio.lowlevel.open_process(
        [
            *(sys.executable, "-m", "peekproxy", "peek", "--url", world.daemon.client),
            *("--secret-file", str(secret), "--user", "@cli:peekproxy.test", room_id),
        ],
        stdout=subprocess.DEVNULL,
    )
    await world.daemon.wait_for_log(rb'"GET /_peekproxy/v1/sync HTTP/1.1" 200 .*@cli:peekproxy')
    await _long_polls_parked(world.daemon.metrics, 1)  # the CLI's long-poll waits
    started = trio.current_time()
    world.daemon.signal(signal.SIGTERM)
    with trio.fail_after(10):
        assert await world.daemon.wait() == 0
        await cli.wait()
    assert trio.current_time() - started < 1.5

    # The answer a client gets during the drain says the connection closes.
    world.daemon = await spawn(world.config, env=world.env)
    async with httpx.AsyncClient(timeout=30) as http:
        params = {"user_id": "@h:peekproxy.test", "device_id": "D", "timeout": "0"}
        auth = {"Authorization": f"Bearer {SECRET}"}
        url = f"{world.daemon.client}/_peekproxy/v1/sync"
        first = (await http.get(url, params=params, headers=auth)).json()
    async with httpx.AsyncClient(timeout=30) as http:
        async with trio.open_nursery() as waiting:
            answers: list[httpx.Response] = []

            async def long_poll() -> None:
                since = {**params, "since": first["next_batch"], "timeout": "30000"}
                answers.append(await http.get(url, params=since, headers=auth))

            waiting.start_soon(long_poll)
            await _long_polls_parked(world.daemon.metrics, 1)
            world.daemon.signal(signal.SIGTERM)
        [answer] = answers
        assert answer.status_code == 200
        assert answer.headers["connection"] == "close"
    assert await world.daemon.wait() == 0


async def _long_polls_parked(metrics: str, count: int) -> None:
    """Wait until ``count`` delegation ``/sync`` long-polls are in flight
    (``peekproxy_long_polls``, scraped from the daemon's metrics listener)."""
    wanted = f'peekproxy_long_polls{{api="delegation"}} {float(count)}'
    async with httpx.AsyncClient(timeout=10) as http:
        with trio.fail_after(30):
            while True:  # a scrape has no event to wait on: poll
                if wanted in (await http.get(f"{metrics}/metrics")).text:
                    return
                await trio.sleep(0.02)

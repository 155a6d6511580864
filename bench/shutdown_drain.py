"""Benchmark: how fast SIGTERM answers every open ``/sync`` long-poll (docs/operations.md,
"Signals").

A testbed hosting a world_readable room and a peekproxy (real processes over loopback TLS);
``--devices`` devices (one user each, so no rate limit is hit) peek the room through the
delegation API and take their first ``next_batch``.

1. **Floor**: the same devices, one connection each, send ``/sync?since=…&timeout=0`` at
   once: the time until the last answer is what this daemon and this client need to answer
   that many syncs at all.
2. **Drain**: the devices long-poll (``timeout=30000``) on fresh connections; once the daemon
   has read every request (``/proc/net/tcp``: accept and receive queues empty) it gets
   SIGTERM. ``--idle`` more connections sit idle on keep-alive after one ``GET /health``.
   Printed: the time from the signal until the last long-poll is answered, until the last
   idle connection is closed by the daemon, until the process has exited, its exit code,
   and how many answers were a 200 with a ``next_batch``.

Usage: ``.venv/bin/python bench/shutdown_drain.py [--devices 1000] [--idle 200]``. The last line is
``drain: all answered in X s, exit Y s after SIGTERM (floor Z s)``.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peekproxy.demo import (
    free_port,
    start_loopback_testbed,
    start_peekproxy,
    write_loopback_tls,
    write_peekproxy_config,
)
from tests.lifecycle_support import wait_requests_read

SECRET = "bench-secret"


def _raise_open_files(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


async def _syncs(
    base: str,
    users: list[str],
    tokens: dict[str, str],
    timeout_ms: int,
    answers: list[tuple[float, Any]],
) -> None:
    """One ``/sync`` per user at once, each on its own connection; (time answered, answer or
    error) is appended to ``answers`` as each comes."""
    limits = httpx.Limits(max_connections=len(users) + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:

        async def one(user: str) -> None:
            params = {"user_id": user, "device_id": "D", "timeout": str(timeout_ms)}
            params["since"] = tokens[user]
            try:
                response: Any = await http.get(
                    "/_peekproxy/v1/sync",
                    params=params,
                    headers={"Authorization": f"Bearer {SECRET}"},
                )
            except httpx.TransportError as e:
                response = e
            answers.append((time.monotonic(), response))

        async with trio.open_nursery() as nursery:
            for user in users:
                nursery.start_soon(one, user)


async def _idle_connection(port: int) -> trio.SocketStream:
    """A keep-alive connection that asked ``GET /health`` once and now sits idle."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n")
    answer = b""
    while b'"ok"' not in answer:
        answer += await stream.receive_some(4096)
    return stream


async def _closed_at(stream: trio.SocketStream, closed: list[float]) -> None:
    """Append when the server closes ``stream`` (EOF or reset)."""
    try:
        while await stream.receive_some(4096):
            pass
    except trio.BrokenResourceError:
        pass
    closed.append(time.monotonic())
    await stream.aclose()


def _good(answer: Any) -> bool:
    return (
        isinstance(answer, httpx.Response)
        and answer.status_code == 200
        and bool(answer.json().get("next_batch"))
    )


async def main(devices: int, idle_connections: int) -> None:
    _raise_open_files(4 * devices + 1024)
    workdir = Path(tempfile.mkdtemp(prefix="peekproxy-drain-"))
    tls = write_loopback_tls(workdir)
    fed_port, client_port, testbed_port = free_port(), free_port(), free_port()
    config = write_peekproxy_config(
        workdir / "peekproxy",
        federation_port=fed_port,
        client_port=client_port,
        tls=tls,
        secret=SECRET,
    )
    env = {
        **os.environ,
        **tls.env,
        "PEEKPROXY_LOGGING__LEVEL": "INFO",  # the ready line
        "PEEKPROXY_LOGGING__ACCESS_LOG": "false",
        "PEEKPROXY_PEEKS__MAX_REMOTE_PEEKS": "10",
    }
    base = f"http://127.0.0.1:{client_port}"
    async with trio.open_nursery() as nursery:
        _, room_id = await start_loopback_testbed(
            nursery, port=testbed_port, tls=tls, data_dir=workdir / "testbed", room_version="10"
        )
        process = await start_peekproxy(nursery, config, env)
        users = [f"@bench{i}:localhost" for i in range(devices)]
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            for user in users:
                response = await http.post(
                    f"/_peekproxy/v1/peek/{quote(room_id, safe='')}",
                    params={
                        "user_id": user,
                        "device_id": "D",
                        "server_name": f"localhost:{testbed_port}",
                    },
                    json={},
                    headers={"Authorization": f"Bearer {SECRET}"},
                )
                assert response.status_code == 200, response.text
            tokens = {}
            for user in users:
                response = await http.get(
                    "/_peekproxy/v1/sync",
                    params={"user_id": user, "device_id": "D"},
                    headers={"Authorization": f"Bearer {SECRET}"},
                )
                tokens[user] = response.json()["next_batch"]
        print(f"{devices} devices peek {room_id}")

        started = time.monotonic()
        floor: list[tuple[float, Any]] = []
        await _syncs(base, users, tokens, 0, floor)
        floor_s = max(at for at, _ in floor) - started
        print(
            f"floor: {devices} /sync?timeout=0 answered in {floor_s:.3f} s "
            f"({sum(_good(a) for _, a in floor)} good)"
        )

        answers: list[tuple[float, Any]] = []
        done = trio.Event()

        async def long_polls() -> None:
            await _syncs(base, users, tokens, 30_000, answers)
            done.set()

        idle = [await _idle_connection(client_port) for _ in range(idle_connections)]
        closed: list[float] = []
        all_closed = trio.Event()

        async def watch_idle() -> None:
            async with trio.open_nursery() as watchers:
                for stream in idle:
                    watchers.start_soon(_closed_at, stream, closed)
            all_closed.set()

        nursery.start_soon(watch_idle)
        nursery.start_soon(long_polls)
        await wait_requests_read(client_port, devices + idle_connections, timeout=120)
        assert not answers, "a long-poll was answered before SIGTERM"
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await process.wait()
        exited_s = time.monotonic() - signalled
        with trio.fail_after(60):
            await done.wait()
        answered_s = max(at for at, _ in answers) - signalled
        with trio.fail_after(60):
            await all_closed.wait()
        if idle:
            idle_s = max(closed) - signalled
            print(f"idle keep-alive: {len(idle)} connections closed {idle_s:.3f} s after SIGTERM")
        good = sum(_good(a) for _, a in answers)
        print(f"drain: {good}/{devices} answered 200 with a next_batch; exit code {code}")
        print(
            f"drain: all answered in {answered_s:.3f} s, exit {exited_s:.3f} s after SIGTERM "
            f"(floor {floor_s:.3f} s)"
        )
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--idle", type=int, default=200, help="idle keep-alive connections")
    args = parser.parse_args()
    trio.run(main, args.devices, args.idle)

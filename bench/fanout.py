"""Benchmark: /sync fan-out and memory per device peek.

1. **Fan-out.** A peekproxy process peeks one testbed room for N devices (default 1,000),
   each long-polling ``GET /_peekproxy/v1/sync`` over its own connection. One event is sent on
   the testbed; the figure is the time from the testbed sending it until each device's
   long-poll has answered with it: p50, p99 and max, against the goal p99 ≤ 50 ms. The time
   for the event to reach peekproxy (one /send) is printed alongside, as the floor every
   device pays.
   ``--instances 1,2``: the devices are spread round-robin over N peekproxy processes (one
   server name) on one PostgreSQL database, for each N in the same run; a device on a
   process the testbed does not send to wakes through PostgreSQL's NOTIFY. ``--backend``
   (``sqlite|postgres|both``, default both) picks the one-process runs; N > 1 is always
   PostgreSQL (bench/throwaway_pg.py starts a throwaway cluster).
2. **Memory** (bench/peek_memory.py, one process per backend): the peek services over a
   fresh database holding R rooms (default 10,000 subscriptions) and D device peeks (default
   100,000); the resident-memory growth divided by D is the cost per device peek (goal
   ≤ 2 KiB), on each backend of ``--backend``.

Usage: ``.venv/bin/python bench/fanout.py [--devices 1000] [--rooms 10000] [--peeks 100000]
[--instances 1,2] [--backend both]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlencode

import h11
import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peek_memory import memory_figures
from throwaway_pg import BACKENDS, backends_of, store_env, throwaway_database

from peekproxy.demo import (
    free_port,
    start_loopback_testbed,
    start_peekproxy,
    write_loopback_tls,
    write_peekproxy_config,
)

SECRET = "bench-secret"


#: The floor: hypercorn serving a bare ASGI app that parks every request until one trigger,
#: then answers each with a canned sync body. Run as ``fanout.py --floor-server PORT``.
_FLOOR_BODY = json.dumps(
    {
        "next_batch": "pp1_2001",
        "rooms": {
            "peek": {
                "!AbCdEfGhIjKlMnOpQr:localhost:40000": {
                    "timeline": {
                        "events": [
                            {
                                "event_id": "$" + "x" * 43,
                                "sender": "@admin:localhost:40000",
                                "type": "m.room.message",
                                "content": {"msgtype": "m.text", "body": "fan out"},
                                "origin_server_ts": 1_700_000_000_000,
                                "unsigned": {"age": 12},
                            }
                        ],
                        "limited": False,
                        "prev_batch": "pp1_2000",
                    },
                    "state": {"events": []},
                    "ephemeral": {"events": []},
                    "account_data": {"events": []},
                    "unread_notifications": {},
                    "summary": {},
                }
            },
            "leave": {},
        },
    },
    separators=(",", ":"),
).encode()  # the shape and size of peekproxy's answer


def floor_server(port: int, framework: str) -> None:
    """hypercorn + a bare ASGI app (``framework="asgi"``: what any hypercorn-served
    long-poll pays per answer), or + a one-route Starlette app (``"starlette"``: what
    peekproxy's own framework stack pays)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    release = trio.Event()

    async def endpoint(request: Request) -> Response:
        if request.url.path == "/go":
            release.set()
        else:
            await release.wait()
        return Response(_FLOOR_BODY, media_type="application/json")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/go":
            release.set()
        else:
            await release.wait()
        headers = [(b"content-type", b"application/json")]
        headers.append((b"content-length", str(len(_FLOOR_BODY)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": _FLOOR_BODY})

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.backlog = 4096
    if framework == "starlette":
        app = Starlette(routes=[Route("/go", endpoint), Route("/sync", endpoint)])
    trio.run(partial(serve, cast(Any, app), config))


async def long_poll(
    port: int,
    target: str,
    headers: list[tuple[str, str]],
    sent: Callable[[], None] = lambda: None,
) -> tuple[int, bytes]:
    """One HTTP/1.1 GET on its own connection, parsed with h11: (status, body); ``sent`` is
    called once the request is written. A client this thin keeps the figure about the
    server, not about client-side overhead."""
    connection = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = h11.Request(
            method="GET", target=target, headers=[("host", "peekproxy"), *headers]
        )
        await stream.send_all(connection.send(request) + connection.send(h11.EndOfMessage()))
        sent()
        status, body = 0, b""
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, body
            elif isinstance(event, h11.ConnectionClosed):
                raise RuntimeError("connection closed before the response ended")


async def time_fan_out(
    polls: list[tuple[int, str, list[tuple[str, str]]]],
    trigger: Callable[[], Awaitable[float]],
    check: Callable[[bytes], None],
) -> list[float]:
    """Park every long-poll, then call ``trigger`` (it returns the moment it fired) and wait
    for all: each poll's latency after that moment, ms, sorted."""
    answered: list[float] = []
    sent = [0]
    all_sent = trio.Event()

    def one_sent() -> None:
        sent[0] += 1
        if sent[0] == len(polls):
            all_sent.set()

    async def one(port: int, target: str, headers: list[tuple[str, str]]) -> None:
        status, body = await long_poll(port, target, headers, one_sent)
        answered.append(time.perf_counter())
        if status != 200:
            raise RuntimeError(f"long-poll answered {status}: {body[:200]!r}")
        check(body)

    async with trio.open_nursery() as nursery:
        for poll in polls:
            nursery.start_soon(one, *poll)
        await all_sent.wait()
        await trio.sleep(1.5)  # a bench, not a test: let every request reach the server and park
        print(f"  {len(polls)} long-polls parked", flush=True)
        if os.environ.get("FANOUT_PAUSE"):  # time to attach a profiler
            await trio.sleep(float(os.environ["FANOUT_PAUSE"]))
        fired_at = await trigger()
    return sorted((t - fired_at) * 1000 for t in answered)


def _summary(latencies: list[float]) -> tuple[float, float, float]:
    p99 = latencies[max(0, math.ceil(len(latencies) * 0.99) - 1)]
    return statistics.median(latencies), p99, latencies[-1]


async def floor(devices: int, framework: str) -> list[float]:
    port = free_port()
    process = await trio.lowlevel.open_process(
        [sys.executable, __file__, "--floor-server", str(port), "--framework", framework],
        stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(30):
            while True:
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.05)

        async def trigger() -> float:
            fired_at = time.perf_counter()
            await long_poll(port, "/go", [])
            return fired_at

        def check(body: bytes) -> None:
            assert body == _FLOOR_BODY

        polls: list[tuple[int, str, list[tuple[str, str]]]]
        polls = [(port, f"/sync?device={d}", []) for d in range(devices)]
        return await time_fan_out(polls, trigger, check)
    finally:
        process.terminate()
        await process.wait()


@dataclass(frozen=True)
class Setup:
    """One fan-out configuration: the backend and how many peekproxy processes share it."""

    backend: str
    instances: int

    @property
    def label(self) -> str:
        """``"sqlite, 1 process"``, ``"postgres, 2 processes"``."""
        return f"{self.backend}, {self.instances} process{'es' if self.instances > 1 else ''}"


async def _peek_devices(
    nursery_limit: int, devices: int, room_id: str, client_ports: list[int]
) -> list[tuple[int, str, list[tuple[str, str]]]]:
    """Peek ``room_id`` for each device through the delegation API of its process (devices
    round-robin over ``client_ports``), sync once for a token: each device's long-poll."""
    headers = {"Authorization": f"Bearer {SECRET}"}
    polls: list[tuple[int, str, list[tuple[str, str]]]] = [(0, "", [])] * devices
    limiter = trio.CapacityLimiter(nursery_limit)

    async def one(http: httpx.AsyncClient, device: int) -> None:
        port = client_ports[device % len(client_ports)]
        base = f"http://127.0.0.1:{port}/_peekproxy/v1"
        params = {"user_id": f"@u{device}:localhost", "device_id": "D"}
        async with limiter:
            response = await http.post(
                f"{base}/peek/{quote(room_id, safe='')}", params=params, json={}
            )
            response.raise_for_status()
            token = (await http.get(f"{base}/sync", params=params)).json()["next_batch"]
        query = urlencode({**params, "since": token, "timeout": "60000"})
        polls[device] = (
            port,
            f"/_peekproxy/v1/sync?{query}",
            [("authorization", f"Bearer {SECRET}")],
        )

    async with (
        httpx.AsyncClient(headers=headers, timeout=120) as http,
        trio.open_nursery() as nursery,
    ):
        for device in range(devices):
            nursery.start_soon(one, http, device)
    return polls


async def fanout(devices: int, directory: Path, setup: Setup, dsn: str | None) -> list[float]:
    """Devices spread round-robin over ``setup.instances`` peekproxy processes (one server
    name, one signing key; on the PostgreSQL database ``dsn``, or SQLite for ``None``),
    one event sent on the testbed: each device's wake latency, ms, sorted. The testbed
    sends to the first process (the server name's port); the others learn of the event
    from PostgreSQL's NOTIFY."""
    await trio.Path(directory).mkdir(parents=True, exist_ok=True)
    tls = write_loopback_tls(directory)
    pp_port, tb_port = free_port(), free_port()
    client_ports = [free_port() for _ in range(setup.instances)]
    metrics_ports = [free_port() for _ in range(setup.instances)]
    config_path = write_peekproxy_config(
        directory / "peekproxy",
        federation_port=pp_port,
        client_port=client_ports[0],
        tls=tls,
        secret=SECRET,
    )
    env = {
        **os.environ,
        **tls.env,
        **store_env(dsn),
        "PEEKPROXY_LOGGING__ACCESS_LOG": "false",
        "PEEKPROXY_LISTENERS__METRICS__ENABLED": "true",
        "PEEKPROXY_PEEKS__RATE_LIMIT_BURST": str(devices + 10),
        "PEEKPROXY_PEEKS__RATE_LIMIT_PER_SECOND": "10000",
    }

    async with trio.open_nursery() as nursery:
        processes = []
        for i in range(setup.instances):
            federation_port = pp_port if i == 0 else free_port()
            own = {
                "PEEKPROXY_LISTENERS__CLIENT__BIND": f"127.0.0.1:{client_ports[i]}",
                "PEEKPROXY_LISTENERS__FEDERATION__BIND": f"127.0.0.1:{federation_port}",
                "PEEKPROXY_LISTENERS__METRICS__BIND": f"127.0.0.1:{metrics_ports[i]}",
            }
            processes.append(await start_peekproxy(nursery, config_path, {**env, **own}))
        testbed, room_id = await start_loopback_testbed(
            nursery, port=tb_port, tls=tls, data_dir=directory / "testbed", room_version="10"
        )
        polls = await _peek_devices(16, devices, room_id, client_ports)
        sent: dict[str, Any] = {}
        stored = trio.Event()

        async def trigger() -> float:
            sent["at"] = time.perf_counter()
            sent["event_id"] = testbed.send(
                room_id,
                sender="admin",
                type="m.room.message",
                content={"msgtype": "m.text", "body": "fan out"},
            )
            nursery.start_soon(note_delivery)
            return float(sent["at"])

        async def note_delivery() -> None:
            sender = testbed.senders[f"localhost:{pp_port}"]
            await testbed.wait_until(
                lambda: any(
                    sent["event_id"] in t.event_ids and t.status == "sent"
                    for t in sender.transactions
                )
            )
            sent["stored"] = time.perf_counter()
            stored.set()

        def check(body: bytes) -> None:
            events = json.loads(body)["rooms"]["peek"][room_id]["timeline"]["events"]
            assert [e["event_id"] for e in events] == [sent["event_id"]]

        latencies = await time_fan_out(polls, trigger, check)
        with trio.fail_after(30):
            await stored.wait()
        answers: dict[str, float] = {}
        async with httpx.AsyncClient() as scrape:
            for port in metrics_ports:
                metrics = (await scrape.get(f"http://127.0.0.1:{port}/metrics")).text
                pattern = r'peekproxy_sync_answers_total\{source="(\w+)"\} (\S+)'
                for source, value in re.findall(pattern, metrics):
                    answers[source] = answers.get(source, 0.0) + float(value)
        print(
            f"  syncs answered from memory: {answers.get('memory', 0):.0f}, "
            f"from the store: {answers.get('store', 0):.0f} "
            f"(the store: each device's first sync)"
        )
        print(
            f"  peekproxy answered the testbed's /send after "
            f"{(sent['stored'] - sent['at']) * 1000:7.1f} ms (the event is stored before any "
            "device wakes; the answer itself queues behind the woken devices)"
        )
        nursery.cancel_scope.cancel()
    for process in processes:
        process.terminate()
        await process.wait()
    return latencies


async def fan_out_figures(
    devices: int, directory: Path, setups: list[Setup], dsn: str | None
) -> None:
    """Each setup's fan-out (each PostgreSQL setup on a fresh database of the cluster behind
    ``dsn``), then the single-process peer and floor, all in this run."""
    print(f"fan-out: {devices} devices long-polling one peeked room, one event")
    ours: list[tuple[Setup, tuple[float, float, float]]] = []
    for n, setup in enumerate(setups):
        print(f" {setup.label}:", flush=True)
        own_dsn = None
        if setup.backend == "postgres":
            assert dsn is not None
            own_dsn = await trio.to_thread.run_sync(_fresh_database, dsn, n)
        ours.append((setup, _summary(await fanout(devices, directory / str(n), setup, own_dsn))))
    peer = _summary(await floor(devices, "starlette"))
    bare = _summary(await floor(devices, "asgi"))
    rows = [
        (
            f"peekproxy ({setup.label})",
            figures,
            f"goal p99 <= 50 ms: {'PASS' if figures[1] <= 50 else 'BELOW GOAL'}",
        )
        for setup, figures in ours
    ]
    rows.append(
        ("peer", peer, "hypercorn + Starlette, one route, a canned answer of the same size")
    )
    rows.append(("floor", bare, "hypercorn + a bare ASGI app, one process, the same answer"))
    width = max(len(name) for name, _, _ in rows) + 1
    for name, (p50, p99, worst), what in rows:
        shown = f"p50 {p50:7.1f} ms, p99 {p99:7.1f} ms, max {worst:7.1f} ms"
        print(f"  {name + ':':<{width}} {shown}  ({what})")
    for setup, figures in ours:
        print(
            f"  ratio of p99s ({setup.label}): peekproxy / peer {figures[1] / peer[1]:.2f}, "
            f"peekproxy / floor {figures[1] / bare[1]:.2f}"
        )


def _fresh_database(dsn: str, n: int) -> str:
    """A new empty database beside the one of ``dsn`` (same cluster), named after it."""
    import psycopg

    name = f"{psycopg.conninfo.conninfo_to_dict(dsn)['dbname']}_{n}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return psycopg.conninfo.make_conninfo(dsn, dbname=name)


def _setups(instances: list[int], backend: str) -> list[Setup]:
    """The fan-out runs: SQLite for one process when asked, PostgreSQL for every N
    (always for N > 1: several processes need the shared store)."""
    setups = []
    for n in instances:
        if n == 1 and backend in ("sqlite", "both"):
            setups.append(Setup("sqlite", 1))
        if n > 1 or backend in ("postgres", "both"):
            setups.append(Setup("postgres", n))
    return setups


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rooms", type=int, default=10_000)
    parser.add_argument("--peeks", type=int, default=100_000)
    parser.add_argument(
        "--instances",
        default="1",
        help="comma-separated process counts for the fan-out, e.g. 1,2 (N > 1: PostgreSQL)",
    )
    parser.add_argument("--backend", default="both", choices=BACKENDS)
    parser.add_argument("--floor-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--framework", default="asgi", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_server:
        floor_server(args.floor_server, args.framework)
        return 0
    instances = [int(n) for n in args.instances.split(",")]
    setups = _setups(instances, args.backend)
    memory_figures(args.rooms, args.peeks, backends_of(args.backend))
    with tempfile.TemporaryDirectory(prefix="fanout-") as directory:
        if all(setup.backend == "sqlite" for setup in setups):
            trio.run(fan_out_figures, args.devices, Path(directory), setups, None)
        else:
            with throwaway_database() as dsn:
                trio.run(fan_out_figures, args.devices, Path(directory), setups, dsn)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

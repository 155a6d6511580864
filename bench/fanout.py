"""Benchmark: /sync fan-out and memory per device peek.

1. **Fan-out.** A peekproxy process peeks one testbed room for N devices (default 1,000),
   each long-polling ``GET /_peekproxy/v1/sync`` over its own connection. One event is sent on
   the testbed; the figure is the time from the testbed sending it until each device's
   long-poll has answered with it: p50, p99 and max, against the goal p99 ≤ 50 ms. The time
   for the event to reach peekproxy (one /send) is printed alongside, as the floor every
   device pays.
2. **Memory.** In this process, the peek services over a fresh database holding R rooms
   (default 10,000 subscriptions) and D device peeks (default 100,000) is started; the
   resident-memory growth divided by D is the cost per device peek (goal ≤ 2 KiB).

Usage: ``.venv/bin/python bench/fanout.py [--devices 1000] [--rooms 10000] [--peeks 100000]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlencode

import h11
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


async def fanout(devices: int, directory: Path) -> list[float]:
    tls = write_loopback_tls(directory)
    pp_port, tb_port, client_port = free_port(), free_port(), free_port()
    metrics_port = free_port()
    config_path = write_peekproxy_config(
        directory / "peekproxy",
        federation_port=pp_port,
        client_port=client_port,
        tls=tls,
        secret=SECRET,
    )
    env = {
        **os.environ,
        **tls.env,
        "PEEKPROXY_LOGGING__ACCESS_LOG": "false",
        "PEEKPROXY_LISTENERS__METRICS__ENABLED": "true",
        "PEEKPROXY_LISTENERS__METRICS__BIND": f"127.0.0.1:{metrics_port}",
        "PEEKPROXY_PEEKS__RATE_LIMIT_BURST": str(devices + 10),
        "PEEKPROXY_PEEKS__RATE_LIMIT_PER_SECOND": "10000",
    }
    base = f"http://127.0.0.1:{client_port}/_peekproxy/v1"
    headers = {"Authorization": f"Bearer {SECRET}"}

    async with trio.open_nursery() as nursery:
        process = await start_peekproxy(nursery, config_path, env)
        testbed, room_id = await start_loopback_testbed(
            nursery, port=tb_port, tls=tls, data_dir=directory / "testbed", room_version="10"
        )
        polls: list[tuple[int, str, list[tuple[str, str]]]] = []
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120) as http:
            for device in range(devices):
                params = {"user_id": f"@u{device}:localhost", "device_id": "D"}
                response = await http.post(
                    f"/peek/{quote(room_id, safe='')}", params=params, json={}
                )
                response.raise_for_status()
                token = (await http.get("/sync", params=params)).json()["next_batch"]
                query = urlencode({**params, "since": token, "timeout": "60000"})
                polls.append(
                    (
                        client_port,
                        f"/_peekproxy/v1/sync?{query}",
                        [("authorization", f"Bearer {SECRET}")],
                    )
                )
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
        async with httpx.AsyncClient() as scrape:
            metrics = (await scrape.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        answers = dict(re.findall(r'peekproxy_sync_answers_total\{source="(\w+)"\} (\S+)', metrics))
        print(
            f"  syncs answered from memory: {float(answers.get('memory', 0)):.0f}, "
            f"from the store: {float(answers.get('store', 0)):.0f} "
            f"(the store: each device's first sync)"
        )
        print(
            f"  peekproxy answered the testbed's /send after "
            f"{(sent['stored'] - sent['at']) * 1000:7.1f} ms (the event is stored before any "
            "device wakes; the answer itself queues behind the woken devices)"
        )
        nursery.cancel_scope.cancel()
    process.terminate()
    await process.wait()
    return latencies


async def fan_out_figures(devices: int, directory: Path) -> None:
    print(f"fan-out: {devices} devices long-polling one peeked room, one event")
    ours = _summary(await fanout(devices, directory))
    peer = _summary(await floor(devices, "starlette"))
    bare = _summary(await floor(devices, "asgi"))
    for name, (p50, p99, worst), what in (
        ("peekproxy", ours, f"goal p99 <= 50 ms: {'PASS' if ours[1] <= 50 else 'BELOW GOAL'}"),
        ("peer", peer, "hypercorn + Starlette, one route, a canned answer of the same size"),
        ("floor", bare, "hypercorn + a bare ASGI app, the same canned answer"),
    ):
        figures = f"p50 {p50:7.1f} ms, p99 {p99:7.1f} ms, max {worst:7.1f} ms"
        print(f"  {name + ':':<11} {figures}  ({what})")
    print(
        f"  ratio of p99s: peekproxy / peer {ours[1] / peer[1]:.2f}, "
        f"peekproxy / floor {ours[1] / bare[1]:.2f}"
    )


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(re.findall(r"\d+", line)[0])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def memory(rooms: int, peeks: int, directory: Path) -> None:
    import logging

    logging.disable(logging.WARNING)  # renewals to the made-up remote fail: not the point
    from peekproxy.core.subscription import Subscription, SubState
    from peekproxy.core.sync import DevicePeek
    from peekproxy.federation.client import FederationClient, build_ssl_context
    from peekproxy.federation.discovery import DnspythonLookup
    from peekproxy.federation.ip_policy import IpFilter
    from peekproxy.federation.keyring import Keyring
    from peekproxy.services.assembly import PeekSettings, build_services
    from peekproxy.services.settings import LiveSettings
    from peekproxy.store import WriteTransaction
    from peekproxy.store.sqlite import open_sqlite

    store = await open_sqlite(directory / "memory.db", "localhost:1")
    now = int(time.time() * 1000)

    def fill(tx: WriteTransaction) -> None:
        for r in range(rooms):
            tx.save_subscription(
                Subscription(
                    room_id=f"!room{r}:remote.test",
                    state=SubState.ACTIVE,
                    candidates=("remote.test",),
                    room_version="10",
                    server="remote.test",
                    peek_id=f"p{r:07d}",
                    remote_interval_ms=3_600_000,
                    last_renewed_ms=now,
                    renew_at_ms=now + 1_800_000,
                ),
            )
        for p in range(peeks):
            tx.set_device_peek(
                f"@user{p // 10}:local.test",
                f"D{p % 10}",
                f"!room{p % rooms}:remote.test",
                "active",
                now,
            )

    await store.write(fill)
    client = FederationClient(
        server_name=None,
        signing_key=None,
        dns=DnspythonLookup(),
        ip_filter=IpFilter([]),
        ssl_context=build_ssl_context(),
    )
    gc.collect()
    before = _rss_kib()
    service = build_services(
        store=store,
        client=client,
        keyring=Keyring(client),
        settings=PeekSettings(
            linger_ms=60_000,
            renewal_max_ms=1_800_000,
            live=LiveSettings(max_remote_peeks=rooms + 1),
        ),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        # Every device has synced once: the live window knows its peeks, as in steady state.
        # Read in chunks, as syncs would: one big temporary list would stay resident.
        upto = service.syncing.live.watermark
        assert upto is not None
        after_rowid = 0
        while True:
            chunk = await store.read(
                partial(
                    lambda tx, after: tx.connection.execute(
                        "SELECT rowid, user_id, device_id, room_id, state, changed_pos "
                        "FROM device_peeks WHERE rowid > ? ORDER BY rowid LIMIT 2000",
                        (after,),
                    ).fetchall(),
                    after=after_rowid,
                )
            )
            if not chunk:
                break
            after_rowid = chunk[-1][0]
            for _, user_id, device_id, room_id, state, changed_pos in chunk:
                service.syncing.live.load_device(
                    (user_id, device_id), [DevicePeek(room_id, state, changed_pos)], upto
                )
        devices = service.syncing.live.known_devices()
        gc.collect()
        after = _rss_kib()
        nursery.cancel_scope.cancel()
    per_peek = (after - before) * 1024 / peeks
    print(
        f"memory: {peeks:,} device peeks over {rooms:,} rooms: +{after - before:,} KiB "
        f"resident, {per_peek:,.0f} bytes per device peek (goal <= 2048: "
        f"{'PASS' if per_peek <= 2048 else 'BELOW GOAL'}; "
        f"{devices:,} devices known to the live window)"
    )
    await client.aclose()
    await store.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rooms", type=int, default=10_000)
    parser.add_argument("--peeks", type=int, default=100_000)
    parser.add_argument("--floor-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--framework", default="asgi", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_server:
        floor_server(args.floor_server, args.framework)
        return 0
    with tempfile.TemporaryDirectory(prefix="fanout-") as directory:
        trio.run(memory, args.rooms, args.peeks, Path(directory))
        trio.run(fan_out_figures, args.devices, Path(directory))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: what the sync front costs a Synapse user (docs/front.md, docs/reverse-proxy.md).

A real Synapse, a testbed hosting a world_readable room, peekproxy in front mode, and two
nginx instances running the shipped configuration (contrib/nginx/peekproxy.conf): the
**front** one routes ``/sync`` to peekproxy (which forwards it to Synapse and merges the peek
section in), the **direct** one is the same file with Synapse in peekproxy's place.

1. ``/sync?since=…&timeout=0`` for one user who peeks the testbed room and is joined to a room
   of their own: p50 and p99 through nginx → peekproxy → Synapse against nginx → Synapse, the
   requests interleaved one by one (the machine's noise hits all alike). Goal: the p50 ratio
   ≤ 1.10. The **floor** beside them: the same nginx in front of a bare hypercorn + httpx
   forwarder (no routing, auth, JSON or peeks): what one more Python HTTP hop costs any front.
2. **Wake latency** of a peeked event: one device long-polls the front ``/sync`` through nginx,
   another the delegation API's ``/_peekproxy/v1/sync`` on peekproxy's client listener; one
   testbed event wakes both. p50 of each, from the send to the answer.

Usage: ``.venv/bin/python bench/front_overhead.py [--rounds 300] [--wakes 20]``. Needs
Synapse in ./.synapse-venv and nginx (``make test-deps`` installs both). The last line is
``ratio p50 front/direct: X``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import httpx
import trio
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peekproxy.demo import (
    free_port,
    start_loopback_testbed,
    start_peekproxy,
    write_loopback_tls,
    write_peekproxy_config,
)
from tests.proxies import start_reverse_proxy
from tests.synapse import running_synapse

SECRET = "bench-secret"


def floor_server(port: int, upstream: str) -> None:
    """The floor of any Python front: hypercorn (trio) + a bare ASGI app that forwards each
    request to ``upstream`` with one shared httpx client and answers with its bytes; no
    routing, no auth, no JSON. Run as ``front_overhead.py --floor-server PORT UPSTREAM``."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    http = httpx.AsyncClient(base_url=upstream, timeout=60)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        headers = {k.decode(): v.decode() for k, v in scope["headers"] if k == b"authorization"}
        path = scope["raw_path"].decode() + ("?" + scope["query_string"].decode())
        response = await http.get(path, headers=headers)
        body = response.content
        out = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": response.status_code, "headers": out})
        await send({"type": "http.response.body", "body": body})

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    trio.run(partial(serve, cast(Any, app), config))


async def start_floor(nursery: trio.Nursery, upstream: str) -> tuple[trio.Process, int]:
    port = free_port()
    process = await trio.lowlevel.open_process(
        [sys.executable, __file__, "--floor-server", str(port), upstream],
        stderr=subprocess.DEVNULL,
    )
    with trio.fail_after(30):
        async with httpx.AsyncClient() as http:
            while True:
                try:
                    await http.get(f"http://127.0.0.1:{port}/_matrix/client/versions")
                    return process, port
                except httpx.TransportError:
                    await trio.sleep(0.05)


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _timed_get(http: httpx.AsyncClient, url: str, token: str) -> tuple[float, Any]:
    started = time.perf_counter()
    response = await http.get(url, headers={"Authorization": f"Bearer {token}"})
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed, response.json()


async def bench(rounds: int, wakes: int, directory: Path) -> float:
    tls = write_loopback_tls(directory)
    pp_port, tb_port, client_port = free_port(), free_port(), free_port()
    config_path = write_peekproxy_config(
        directory / "peekproxy",
        federation_port=pp_port,
        client_port=client_port,
        tls=tls,
        secret=SECRET,
    )
    with running_synapse(trustme.CA(), directory / "synapse") as synapse:
        hs_address = synapse.client.removeprefix("http://")
        env = {
            **os.environ,
            **tls.env,
            "PEEKPROXY_LOGGING__ACCESS_LOG": "false",
            "PEEKPROXY_UPSTREAM__HOMESERVER_URL": synapse.client,
        }
        async with trio.open_nursery() as nursery:
            process = await start_peekproxy(nursery, config_path, env)
            testbed, room_id = await start_loopback_testbed(
                nursery, port=tb_port, tls=tls, data_dir=directory / "testbed", room_version="10"
            )
            front = await start_reverse_proxy(
                directory / "nginx-front",
                "nginx",
                homeserver=hs_address,
                peekproxy=f"127.0.0.1:{client_port}",
            )
            direct = await start_reverse_proxy(
                directory / "nginx-direct", "nginx", homeserver=hs_address, peekproxy=hs_address
            )
            floor_process, floor_port = await start_floor(nursery, synapse.client)
            floor = await start_reverse_proxy(
                directory / "nginx-floor",
                "nginx",
                homeserver=hs_address,
                peekproxy=f"127.0.0.1:{floor_port}",
            )
            try:
                ratio = await _measure(
                    rounds, wakes, synapse.register("bench"),
                    {"front": front.url, "floor": floor.url, "direct": direct.url},
                    client_port, testbed, room_id, f"localhost:{tb_port}",
                )  # fmt: skip
            finally:
                for proxy in (front, direct, floor):
                    await proxy.stop()
                floor_process.terminate()
                await floor_process.wait()
                process.terminate()
                await process.wait()
                nursery.cancel_scope.cancel()
    return ratio


async def _measure(
    rounds: int,
    wakes: int,
    token: str,
    urls: dict[str, str],
    client_port: int,
    testbed: Any,
    room_id: str,
    testbed_name: str,
) -> float:
    front_url, direct_url = urls["front"], urls["direct"]
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(timeout=120) as http:
        # The user's own room on Synapse, with some history, and a peek of the testbed room.
        own = await http.post(
            f"{direct_url}/_matrix/client/v3/createRoom", headers=auth, json={"name": "own"}
        )
        own_room = quote(own.json()["room_id"], safe="")
        for n in range(5):
            await http.put(
                f"{direct_url}/_matrix/client/v3/rooms/{own_room}/send/m.room.message/t{n}",
                headers=auth,
                json={"msgtype": "m.text", "body": f"message {n}"},
            )
        peeked = await http.post(
            f"{front_url}/_matrix/client/v3/peek/{quote(room_id, safe='')}",
            params={"server_name": testbed_name},
            headers=auth,
            json={},
        )
        peeked.raise_for_status()
        _, first = await _timed_get(http, f"{front_url}/_matrix/client/v3/sync", token)
        assert room_id in first["rooms"]["peek"], "the front's initial sync lacks the peek"
        since = first["next_batch"]
        _, again = await _timed_get(
            http, f"{front_url}/_matrix/client/v3/sync?since={since}&timeout=0", token
        )
        since = again["next_batch"]
        path = f"/_matrix/client/v3/sync?since={quote(since)}&timeout=0"
        times: dict[str, list[float]] = {name: [] for name in urls}
        for _ in range(rounds):
            for name, base in urls.items():
                elapsed, _ = await _timed_get(http, base + path, token)
                times[name].append(elapsed)
        p50 = {name: _ms(values, 0.5) for name, values in times.items()}
        p99 = {name: _ms(values, 0.99) for name, values in times.items()}
        print(f"/sync?timeout=0, {rounds} each, interleaved (user joined to 1 room, peeking 1):")
        routes = {
            "front": "nginx→peekproxy→Synapse",
            "floor": "nginx→bare hypercorn+httpx forward→Synapse",
            "direct": "nginx→Synapse",
        }
        for name, route in routes.items():
            print(f"  {name:6} ({route:43}) p50 {p50[name]:6.2f} ms  p99 {p99[name]:6.2f} ms")
        print(
            f"ratio p50 floor/direct: {p50['floor'] / p50['direct']:.2f} (any Python hop pays "
            f"this); front/floor: {p50['front'] / p50['floor']:.2f} (peekproxy's own part)"
        )
        print(f"ratio p99 front/direct: {p99['front'] / p99['direct']:.2f}")
        await _wake_latency(http, wakes, token, front_url, client_port, testbed, room_id, since)
    ratio = p50["front"] / p50["direct"]
    print(f"ratio p50 front/direct: {ratio:.2f}")
    return ratio


async def _wake_latency(
    http: httpx.AsyncClient,
    wakes: int,
    token: str,
    front_url: str,
    client_port: int,
    testbed: Any,
    room_id: str,
    since: str,
) -> None:
    delegation = f"http://127.0.0.1:{client_port}/_peekproxy/v1"
    device = {"user_id": "@bench-delegated:localhost", "device_id": "D"}
    secret = {"Authorization": f"Bearer {SECRET}"}
    peeked = await http.post(
        f"{delegation}/peek/{quote(room_id, safe='')}", params=device, headers=secret, json={}
    )
    peeked.raise_for_status()
    delegated_since = (await http.get(f"{delegation}/sync", params=device, headers=secret)).json()[
        "next_batch"
    ]
    front_ms: list[float] = []
    delegated_ms: list[float] = []
    front_query = {"since": since, "timeout": "30000"}
    delegated_query = {**device, "since": delegated_since, "timeout": "30000"}

    async def poll(name: str, url: str, query: dict[str, str], headers: dict[str, str]) -> None:
        response = await http.get(url, params=query, headers=headers)
        answers[name] = (time.perf_counter(), response.json())

    answers: dict[str, tuple[float, Any]] = {}
    for n in range(wakes):
        answers.clear()
        async with trio.open_nursery() as polls:
            polls.start_soon(
                poll, "front", f"{front_url}/_matrix/client/v3/sync", front_query,
                {"Authorization": f"Bearer {token}"},
            )  # fmt: skip
            polls.start_soon(poll, "delegated", f"{delegation}/sync", delegated_query, secret)
            await trio.sleep(0.3)  # both long-polls are parked at peekproxy
            sent_at = time.perf_counter()
            event_id = testbed.send(
                room_id,
                sender="admin",
                type="m.room.message",
                content={"msgtype": "m.text", "body": f"wake {n}"},
            )
        for name, out in (("front", front_ms), ("delegated", delegated_ms)):
            at, body = answers[name]
            events = body["rooms"]["peek"][room_id]["timeline"]["events"]
            assert [e["event_id"] for e in events] == [event_id], json.dumps(body)[:500]
            out.append(at - sent_at)
        front_query["since"] = answers["front"][1]["next_batch"]
        delegated_query["since"] = answers["delegated"][1]["next_batch"]
    front_p50, delegated_p50 = _ms(front_ms, 0.5), _ms(delegated_ms, 0.5)
    print(f"wake latency of a peeked testbed event, {wakes} events, p50 from the send:")
    print(f"  front /sync through nginx      {front_p50:6.2f} ms")
    print(f"  delegation API /_peekproxy/v1  {delegated_p50:6.2f} ms")
    print(
        f"  ratio front/delegation: {front_p50 / delegated_p50:.2f} "
        f"(the front adds {front_p50 - delegated_p50:.2f} ms at the median: nginx, the "
        "homeserver's timeout=0 answer to the same since, the merge)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--wakes", type=int, default=20)
    parser.add_argument(
        "--floor-server", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.floor_server:
        floor_server(int(args.floor_server[0]), args.floor_server[1])
        return 0
    with tempfile.TemporaryDirectory() as directory:
        trio.run(bench, args.rounds, args.wakes, Path(directory))
    return 0


if __name__ == "__main__":
    sys.exit(main())

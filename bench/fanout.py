"""Benchmark: /sync fan-out and memory per device peek.

1. **Fan-out.** A peekproxy process peeks one testbed room for N devices (default 1,000),
   each long-polling ``GET /_peekproxy/v1/sync`` over its own connection. One event is sent on
   the testbed; the figure is the time from the testbed sending it until each device's
   long-poll has answered with it: p50, p99 and max, against the goal p99 ≤ 50 ms. The time
   for the event to reach peekproxy (one /send) is printed alongside, as the floor every
   device pays.
2. **Memory.** In this process, a PeekService over a fresh database holding R rooms
   (default 10,000 subscriptions) and D device peeks (default 100,000) is started; the
   resident-memory growth divided by D is the cost per device peek (goal ≤ 2 KiB).

Usage: ``.venv/bin/python bench/fanout.py [--devices 1000] [--rooms 10000] [--peeks 100000]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peekproxy.demo import (
    free_port,
    start_peekproxy,
    write_loopback_tls,
    write_peekproxy_config,
)
from peekproxy.testbed.config import testbed_config_from_flags
from peekproxy.testbed.server import Testbed, TestbedListening, run_testbed

SECRET = "bench-secret"


async def fanout(devices: int, directory: Path) -> None:
    tls = write_loopback_tls(directory)
    pp_port, tb_port, client_port = free_port(), free_port(), free_port()
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
        "PEEKPROXY_PEEKS__RATE_LIMIT_BURST": str(devices + 10),
        "PEEKPROXY_PEEKS__RATE_LIMIT_PER_SECOND": "10000",
    }
    base = f"http://127.0.0.1:{client_port}/_peekproxy/v1"
    headers = {"Authorization": f"Bearer {SECRET}"}

    async with trio.open_nursery() as nursery:
        process = await start_peekproxy(nursery, config_path, env)
        config = testbed_config_from_flags(
            server_name=f"localhost:{tb_port}",
            federation_bind=f"127.0.0.1:{tb_port}",
            admin_bind="127.0.0.1:0",
            tls_cert=str(tls.cert),
            tls_key=str(tls.key),
            data_dir=str(directory / "testbed"),
            environ={},
            extra={
                "federation": {
                    "ip_range_whitelist": ["127.0.0.0/8"],
                    "tls_ca_file": str(tls.ca_file),
                },
                "logging": {"level": "WARNING", "access_log": False},
            },
        )
        started: tuple[TestbedListening, Testbed] = await nursery.start(
            lambda task_status: run_testbed(config, task_status=task_status)
        )
        testbed = started[1]
        room = testbed.create_room(
            room_version="10",
            creator="admin",
            alias=None,
            history_visibility="world_readable",
            join_rule="public",
            encrypted=False,
            name=None,
            topic=None,
            initial_state=[],
        )
        limits = httpx.Limits(max_connections=devices + 10, max_keepalive_connections=devices + 10)
        async with httpx.AsyncClient(
            base_url=base, headers=headers, timeout=120, limits=limits
        ) as http:
            tokens: dict[int, str] = {}
            for device in range(devices):
                params = {"user_id": f"@u{device}:localhost", "device_id": "D"}
                response = await http.post(
                    f"/peek/{quote(room.room_id, safe='')}", params=params, json={}
                )
                response.raise_for_status()
                tokens[device] = (await http.get("/sync", params=params)).json()["next_batch"]
            answered: dict[int, float] = {}
            waiting = trio.Event()
            started_polls = [0]

            async def poll(device: int) -> None:
                params = {
                    "user_id": f"@u{device}:localhost",
                    "device_id": "D",
                    "since": tokens[device],
                    "timeout": "60000",
                }
                started_polls[0] += 1
                if started_polls[0] == devices:
                    waiting.set()
                response = await http.get("/sync", params=params)
                answered[device] = time.perf_counter()
                assert room.room_id in response.json()["rooms"]["peek"]

            async with trio.open_nursery() as polls:
                for device in range(devices):
                    polls.start_soon(poll, device)
                await waiting.wait()
                await trio.sleep(1.0)  # let every long-poll reach the server and park
                sent_at = time.perf_counter()
                event_id = testbed.send(
                    room.room_id,
                    sender="admin",
                    type="m.room.message",
                    content={"msgtype": "m.text", "body": "fan out"},
                )
                sender = testbed.senders[f"localhost:{pp_port}"]
                await testbed.wait_until(
                    lambda: any(
                        event_id in t.event_ids and t.status == "sent" for t in sender.transactions
                    )
                )
                stored_at = time.perf_counter()
        latencies = sorted((t - sent_at) * 1000 for t in answered.values())
        p50 = statistics.median(latencies)
        p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)]
        print(f"fan-out: {devices} long-polling devices, one event")
        print(
            f"  event stored by peekproxy after {(stored_at - sent_at) * 1000:7.1f} ms "
            "(the floor every device pays)"
        )
        print(
            f"  all answered: p50 {p50:7.1f} ms, p99 {p99:7.1f} ms, max {latencies[-1]:7.1f} ms"
            f"  (goal p99 <= 50 ms: {'PASS' if p99 <= 50 else 'BELOW GOAL'})"
        )
        nursery.cancel_scope.cancel()
    process.terminate()
    await process.wait()


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(re.findall(r"\d+", line)[0])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def memory(rooms: int, peeks: int, directory: Path) -> None:
    import logging

    logging.disable(logging.WARNING)  # renewals to the made-up remote fail: not the point
    from peekproxy.federation.client import FederationClient, IpFilter, build_ssl_context
    from peekproxy.federation.discovery import DnspythonLookup
    from peekproxy.federation.keyring import Keyring
    from peekproxy.peeks.service import PeekService, PeekSettings
    from peekproxy.peeks.subscription import Subscription, SubState
    from peekproxy.store import Store
    from peekproxy.store import rooms as db

    store = await Store.open(directory / "memory.db", "localhost:1")
    now = int(time.time() * 1000)

    def fill(conn: sqlite3.Connection) -> None:
        for r in range(rooms):
            db.save_subscription(
                conn,
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
            db.set_device_peek(
                conn,
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
    service = PeekService(
        store=store,
        client=client,
        keyring=Keyring(client),
        settings=PeekSettings(
            linger_ms=60_000,
            renewal_max_ms=1_800_000,
            max_peeks_per_device=100,
            max_remote_peeks=rooms + 1,
        ),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        gc.collect()
        after = _rss_kib()
        nursery.cancel_scope.cancel()
    per_peek = (after - before) * 1024 / peeks
    print(
        f"memory: {peeks:,} device peeks over {rooms:,} rooms: +{after - before:,} KiB "
        f"resident, {per_peek:,.0f} bytes per device peek (goal <= 2048: "
        f"{'PASS' if per_peek <= 2048 else 'BELOW GOAL'})"
    )
    await client.aclose()
    await store.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rooms", type=int, default=10_000)
    parser.add_argument("--peeks", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fanout-") as directory:
        trio.run(memory, args.rooms, args.peeks, Path(directory))
        trio.run(fanout, args.devices, Path(directory))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

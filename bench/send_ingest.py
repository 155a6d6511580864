"""Benchmark: /send ingest — 50-PDU transactions from the testbed into a peekproxy daemon.

peekproxy runs as its own process (``python -m peekproxy run``); the testbed runs in this
one. A room is peeked, then N events are created on the testbed at once, so its sender
pushes them in transactions of 50 PDUs. The clock runs from the first push until peekproxy
has acknowledged the last one (it stores everything before it answers), so the figure is
events verified and stored per second, end to end over TLS.

The run is made on each backend asked for (``--backend sqlite|postgres|both``, default
both): SQLite in the data directory, PostgreSQL in a throwaway cluster
(bench/throwaway_pg.py), each on a fresh database. In the same run it measures the floor of
bench/pdu_verify.py (pynacl signature check plus sha256 over pre-encoded bytes, per event)
and prints each backend's ratio to it. Usage:
``.venv/bin/python bench/send_ingest.py [--events 2000] [--version 10] [--backend both]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pdu_verify import floor_inputs, load, time_floor
from throwaway_pg import BACKENDS, backends_of, store_env, throwaway_database

from peekproxy.demo import (
    free_port,
    start_loopback_testbed,
    start_peekproxy,
    write_loopback_tls,
    write_peekproxy_config,
)

SECRET = "bench-secret"


async def run(events: int, version: str, directory: Path, dsn: str | None) -> float:
    """One ingest run on SQLite (``dsn`` None) or the PostgreSQL database ``dsn``:
    events per second."""
    tls = write_loopback_tls(directory)
    pp_port, tb_port, client_port = free_port(), free_port(), free_port()
    config_path = write_peekproxy_config(
        directory / "peekproxy",
        federation_port=pp_port,
        client_port=client_port,
        tls=tls,
        secret=SECRET,
    )
    env = {**os.environ, **tls.env, **store_env(dsn), "PEEKPROXY_LOGGING__ACCESS_LOG": "false"}
    client_url = f"http://127.0.0.1:{client_port}"

    async with trio.open_nursery() as nursery:
        process = await start_peekproxy(nursery, config_path, env)
        testbed, room_id = await start_loopback_testbed(
            nursery,
            port=tb_port,
            tls=tls,
            data_dir=directory / "testbed" / "data",
            room_version=version,
        )
        async with httpx.AsyncClient(timeout=60) as http:
            response = await http.post(
                f"{client_url}/_peekproxy/v1/peek/{quote(room_id, safe='')}",
                params={"user_id": "@bench:localhost", "device_id": "B"},
                json={},
                headers={"Authorization": f"Bearer {SECRET}"},
            )
        response.raise_for_status()
        peekproxy_name = f"localhost:{pp_port}"
        # All events queued without a checkpoint: delivery starts when this task yields.
        ids = [
            testbed.send(
                room_id,
                sender="admin",
                type="m.room.message",
                content={"msgtype": "m.text", "body": f"event {i}"},
            )
            for i in range(events)
        ]
        sender = testbed.senders[peekproxy_name]
        last = ids[-1]
        start = time.perf_counter()
        await testbed.wait_until(
            lambda: any(last in t.event_ids and t.status == "sent" for t in sender.transactions),
            timeout=600,
        )
        elapsed = time.perf_counter() - start
        sizes = [len(t.event_ids) for t in sender.transactions]
        print(
            f"{events} events in {len(sizes)} transactions (largest {max(sizes)} PDUs), "
            f"room version {version}"
        )
        nursery.cancel_scope.cancel()
    process.terminate()
    await process.wait()
    return events / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--version", default="10", choices=["10", "11", "12"])
    parser.add_argument("--backend", default="both", choices=BACKENDS)
    args = parser.parse_args()
    rates: dict[str, float] = {}
    for backend in backends_of(args.backend):
        with tempfile.TemporaryDirectory(prefix="send-ingest-") as directory:
            if backend == "sqlite":
                rates[backend] = trio.run(run, args.events, args.version, Path(directory), None)
                continue
            with throwaway_database() as dsn:
                rates[backend] = trio.run(run, args.events, args.version, Path(directory), dsn)
    inputs = floor_inputs(load(["10", "11", "12"]))
    floor = min(time_floor(inputs, 40) for _ in range(5))
    floor_rate = len(inputs) * 40 / floor
    for backend, rate in rates.items():
        label = f"ingest on {backend} (verify + store, end to end):"
        print(f"{label:<47} {rate:9,.0f} events/s")
    print(f"{'floor (verify+sha256, same run):':<47} {floor_rate:9,.0f} events/s")
    for backend, rate in rates.items():
        print(f"ratio ingest/floor on {backend}: {rate / floor_rate:.2f}")
    if len(rates) == 2:
        print(f"ratio postgres/sqlite: {rates['postgres'] / rates['sqlite']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

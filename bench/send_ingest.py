"""Benchmark: /send ingest — 50-PDU transactions from the testbed into a peekproxy daemon.

peekproxy runs as its own process (``python -m peekproxy run``); the testbed runs in this
one. A room is peeked, ``--devices`` devices (default 100) peek it too through the
delegation API and keep long-polling ``/_peekproxy/v1/sync`` (each: sync with ``since`` and
``timeout``, then again) for the whole run; then N events are created (and signed) on the
testbed with the clock stopped, so its sender pushes them in transactions of 50 PDUs. The
clock runs from the first push until peekproxy has acknowledged the last one (it stores
everything before it answers), so the figure is events verified and stored per second, end
to end over TLS.

Where the CPU went during the clock is printed beside it: the daemon's (``/proc/PID/stat``,
all its threads) and this process's (the testbed's sender and the devices' client), in cores;
and the daemon's CPU per event (µs), the figure that does not depend on the testbed or on
the other load of the machine. ``--profile FILE`` runs ``py-spy record`` (raw, collapsed
stacks) on the daemon while the clock runs (``SPY_EXTRA="--gil"`` adds py-spy arguments: with
``--gil``, only the thread holding the GIL is sampled, i.e. where the daemon's Python CPU goes).

The run is made on each backend asked for (``--backend sqlite|postgres|both``, default
both): SQLite in the data directory, PostgreSQL in a throwaway cluster
(bench/throwaway_pg.py), each on a fresh database. In the same run it measures the floor of
bench/pdu_verify.py (pynacl signature check plus sha256 over pre-encoded bytes, per event)
and prints each backend's ratio to it. Usage:
``.venv/bin/python bench/send_ingest.py [--events 2000] [--devices 100] [--version 10]
[--backend both] [--profile out.raw]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fanout import SECRET, _peek_devices
from fanout_client import long_poll
from pdu_verify import floor_inputs, load, time_floor
from throwaway_pg import BACKENDS, backends_of, store_env, throwaway_database

from peekproxy.demo import (
    free_port,
    start_loopback_testbed,
    start_peekproxy,
    write_loopback_tls,
    write_peekproxy_config,
)

PY_SPY = str(Path(sys.executable).parent / "py-spy")
#: py-spy's arguments: sampled 200 times a second without stopping the daemon, raw output,
#: and those of ``SPY_EXTRA``.
SPY_ARGS = ("-r", "200", "--nonblocking", "-f", "raw", *os.environ.get("SPY_EXTRA", "").split())


@dataclass(frozen=True)
class Figures:
    """One ingest run: events/s, and the CPU seconds spent while the clock ran."""

    events: int
    elapsed_s: float
    daemon_cpu_s: float
    bench_cpu_s: float
    syncs: int

    @property
    def rate(self) -> float:
        return self.events / self.elapsed_s


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def keep_polling(
    port: int, target: str, headers: list[tuple[str, str]], count: list[int]
) -> None:
    """One device: long-poll, then again from the answer's ``next_batch``, until cancelled."""
    path, _, query = target.partition("?")
    params = dict(parse_qsl(query))
    while True:
        status, body = await long_poll(port, f"{path}?{urlencode(params)}", headers)
        if status != 200:
            raise RuntimeError(f"long-poll answered {status}: {body[:200]!r}")
        params["since"] = json.loads(body)["next_batch"]
        count[0] += 1


async def run(
    events: int,
    version: str,
    directory: Path,
    dsn: str | None,
    devices: int,
    profile: Path | None,
) -> Figures:
    """One ingest run on SQLite (``dsn`` None) or the PostgreSQL database ``dsn``, with
    ``devices`` devices long-polling the room throughout."""
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
        **store_env(dsn),
        "PEEKPROXY_LOGGING__ACCESS_LOG": "false",
        "PEEKPROXY_PEEKS__RATE_LIMIT_BURST": str(devices + 10),
        "PEEKPROXY_PEEKS__RATE_LIMIT_PER_SECOND": "10000",
    }
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
        syncs = [0]
        for poll in await _peek_devices(16, devices, room_id, [client_port], "u"):
            nursery.start_soon(keep_polling, *poll, syncs)
        await trio.sleep(1)  # every long-poll parked
        peekproxy_name = f"localhost:{pp_port}"
        # All events created and queued without a checkpoint: delivery starts when this
        # task yields, once the clock runs.
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
        spy = None
        if profile is not None:
            spy = await trio.lowlevel.open_process(
                [PY_SPY, "record", "-p", str(process.pid), *SPY_ARGS, "-o", str(profile)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            await trio.sleep(1)  # attached
        syncs_before = syncs[0]
        daemon_cpu, bench_cpu = process_cpu_s(process.pid), time.process_time()
        start = time.perf_counter()
        await testbed.wait_until(
            lambda: any(last in t.event_ids and t.status == "sent" for t in sender.transactions),
            timeout=600,
        )
        elapsed = time.perf_counter() - start
        figures = Figures(
            events,
            elapsed,
            process_cpu_s(process.pid) - daemon_cpu,
            time.process_time() - bench_cpu,
            syncs[0] - syncs_before,
        )
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file and exits
            await spy.wait()
        sizes = [len(t.event_ids) for t in sender.transactions]
        print(
            f"{events} events in {len(sizes)} transactions (largest {max(sizes)} PDUs), "
            f"room version {version}, {devices} devices long-polling "
            f"({figures.syncs} syncs answered during the run)"
        )
        nursery.cancel_scope.cancel()
    process.terminate()
    await process.wait()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--version", default="10", choices=["10", "11", "12"])
    parser.add_argument("--backend", default="both", choices=BACKENDS)
    parser.add_argument("--devices", type=int, default=100, help="devices long-polling")
    parser.add_argument("--profile", type=Path, help="py-spy raw output for the daemon")
    args = parser.parse_args()
    rates: dict[str, Figures] = {}
    ingest = partial(run, args.events, args.version, devices=args.devices, profile=args.profile)
    for backend in backends_of(args.backend):
        with tempfile.TemporaryDirectory(prefix="send-ingest-") as directory:
            if backend == "sqlite":
                rates[backend] = trio.run(ingest, Path(directory), None)
                continue
            with throwaway_database() as dsn:
                rates[backend] = trio.run(ingest, Path(directory), dsn)
    inputs = floor_inputs(load(["10", "11", "12"]))
    floor = min(time_floor(inputs, 40) for _ in range(5))
    floor_rate = len(inputs) * 40 / floor
    for backend, run_figures in rates.items():
        label = f"ingest on {backend} (verify + store, end to end):"
        print(f"{label:<47} {run_figures.rate:9,.0f} events/s")
        f = run_figures
        print(
            f"  CPU while the clock ran ({f.elapsed_s:.2f} s): daemon "
            f"{f.daemon_cpu_s / f.elapsed_s:.2f} cores "
            f"({f.daemon_cpu_s / f.events * 1e6:.0f} us/event, i.e. "
            f"{f.events / f.daemon_cpu_s:,.0f} events per daemon CPU second), "
            f"bench process (testbed + devices) {f.bench_cpu_s / f.elapsed_s:.2f} cores"
        )
    print(f"{'floor (verify+sha256, same run):':<47} {floor_rate:9,.0f} events/s")
    for backend, f in rates.items():
        print(f"ratio ingest/floor on {backend}: {f.rate / floor_rate:.2f}")
        print(
            f"ratio daemon CPU rate/floor on {backend}: "
            f"{f.events / f.daemon_cpu_s / floor_rate:.2f}"
        )
    if len(rates) == 2:
        print(f"ratio postgres/sqlite: {rates['postgres'].rate / rates['sqlite'].rate:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

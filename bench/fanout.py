"""Benchmark: /sync fan-out beside its floors and Synapse, /send answer latency, memory per peek.

1. **Fan-out**, at every device count of ``--devices`` (default ``1000,5000``), every server
   in the same run with the same client (bench/fanout_client.py: h11 on raw sockets, one
   connection per device), each for ``--rounds`` fan-outs (default 5; a round's long-polls
   are opened after the previous round answered, from its ``next_batch``; the trigger fires
   once the server's processes have been quiet, under 5% of a core for 0.5 s: every
   long-poll parked). The figure is each answer's latency from the trigger until the
   device's long-poll answered; all rounds pooled, printed as p50, p99 and max (ms):

   - **peekproxy** (``peekproxy (sqlite, 1 process)``): one testbed room peeked by N
     devices, each long-polling ``GET /_peekproxy/v1/sync``; the trigger is one event sent
     on the testbed (event → ``/send`` → verify → store → every device). Each answer is
     checked to hold exactly that event.
   - **trio-h11 floor** (bench/fanout_floors.py): trio + h11 alone in its own process,
     parking every request until ``GET /go`` and answering each with a canned body of the
     size of peekproxy's, in one ``send_all``: this machine's and this client's lower bound.
   - **bare hypercorn** (bench/fanout_floors.py): hypercorn + a bare ASGI app, same canned
     answer: what any hypercorn-served long-poll pays.
   - **synapse** (``--synapse``, bench/fanout_synapse.py): a real Synapse (the tests'
     venv, SQLite), one user logged in on N devices, each long-polling
     ``/_matrix/client/v3/sync?since=…&timeout=60000`` on a joined room; the trigger is
     another user's ``PUT …/send`` (each answer is checked to hold that event ID). The
     Synapse runs for the whole bench (idle while the others are measured); its log is in
     the temporary directory.

   **/send answer latency** (peekproxy): from the testbed sending an event until it had
   peekproxy's answer to the ``/send`` transaction carrying it; first for 5 events with no
   device long-polling (one idle device peek keeps the room followed), then for each
   fan-out round. Printed as ``send answer p99: with N devices X ms, no devices Y ms,
   difference Z ms (goal <= 50 ms)``. The testbed runs in this process beside the client,
   so the figure includes this process's own delay in reading the answer.

   Then the ratios of p99s at each count, with the goals (peekproxy / trio-h11 floor ≤ 1.5,
   peekproxy / Synapse ≤ 0.1); the output ends with ``ratio p99 peekproxy/trio-h11 floor: X``
   and (with ``--synapse``) ``ratio p99 peekproxy/synapse: Y`` at the largest count, for
   the first peekproxy setup.

   ``--instances 1,2``: the devices are spread round-robin over N peekproxy processes (one
   server name) on one PostgreSQL database, for each N in the same run; a device on a
   process the testbed does not send to wakes through PostgreSQL's NOTIFY. ``--backend``
   (``sqlite|postgres|both``, default sqlite, for speed) picks the one-process runs; N > 1
   is always PostgreSQL (bench/throwaway_pg.py starts a throwaway cluster).
2. **Memory** (bench/peek_memory.py, one process per backend; skipped with
   ``--no-memory``): the peek services over a fresh database holding R rooms (default
   10,000 subscriptions) and D device peeks (default 100,000); the resident-memory growth
   divided by D is the cost per device peek (goal ≤ 2 KiB), on each backend of
   ``--backend``. It runs first.

The bench raises its RLIMIT_NOFILE to the hard limit (every server it starts inherits it).

Usage: ``.venv/bin/python bench/fanout.py [--devices 1000,5000] [--rounds 5] [--synapse]
[--no-memory] [--rooms 10000] [--peeks 100000] [--instances 1,2] [--backend sqlite]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import trio
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fanout_client import Poll, fan_out_rounds, raise_fd_limit, summary
from fanout_floors import FLOORS, floor
from fanout_synapse import SynapseRoom, log_config, prepare_room, synapse_fan_out
from peek_memory import memory_figures
from throwaway_pg import BACKENDS, backends_of, store_env, throwaway_database

from peekproxy.demo import (
    free_port,
    start_loopback_testbed,
    start_peekproxy,
    write_loopback_tls,
    write_peekproxy_config,
)
from tests.synapse import Synapse, running_synapse

SECRET = "bench-secret"
#: Events sent with no device long-polling: the /send answer latency without fan-out.
SEND_ALONE = 5


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
    nursery_limit: int, devices: int, room_id: str, client_ports: list[int], prefix: str
) -> list[Poll]:
    """Peek ``room_id`` for each device (user ``@<prefix><n>:localhost``, device ``D``)
    through the delegation API of its process (devices round-robin over ``client_ports``),
    sync once for a token: each device's long-poll."""
    headers = {"Authorization": f"Bearer {SECRET}"}
    polls: list[Poll] = [(0, "", [])] * devices
    limiter = trio.CapacityLimiter(nursery_limit)

    async def one(http: httpx.AsyncClient, device: int) -> None:
        port = client_ports[device % len(client_ports)]
        base = f"http://127.0.0.1:{port}/_peekproxy/v1"
        params = {"user_id": f"@{prefix}{device}:localhost", "device_id": "D"}
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


@dataclass
class PeekproxyRun:
    """One peekproxy fan-out run: every answer's latency (ms, all rounds pooled, sorted) and
    the testbed's ``/send`` answer latencies (ms), alone (no device long-polling) and with
    every device woken by that transaction."""

    latencies: list[float]
    send_alone: list[float]
    send_fanning: list[float]


def _send(testbed: Any, room_id: str) -> str:
    """Send one message on the testbed (queued to every server following the room)."""
    event_id: str = testbed.send(
        room_id,
        sender="admin",
        type="m.room.message",
        content={"msgtype": "m.text", "body": "fan out"},
    )
    return event_id


async def _answered(testbed: Any, destination: str, event_id: str, sent_at: float) -> float:
    """Wait until ``destination`` answered the transaction carrying ``event_id``: the ms
    from ``sent_at`` (``time.perf_counter()``) until the testbed had that answer."""

    def answered() -> bool:
        sender = testbed.senders.get(destination)
        return sender is not None and any(
            event_id in t.event_ids and t.status == "sent" for t in sender.transactions
        )

    await testbed.wait_until(answered)
    return (time.perf_counter() - sent_at) * 1000


async def fanout(
    devices: int, rounds: int, directory: Path, setup: Setup, dsn: str | None
) -> PeekproxyRun:
    """Devices spread round-robin over ``setup.instances`` peekproxy processes (one server
    name, one signing key; on the PostgreSQL database ``dsn``, or SQLite for ``None``).
    First one idle device peeks the room (so peekproxy follows it) and :data:`SEND_ALONE`
    events are sent with no device long-polling; then ``rounds`` fan-outs of one event each
    to every device. The testbed sends to the first process (the server name's port); the
    others learn of each event from PostgreSQL's NOTIFY."""
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
    destination = f"localhost:{pp_port}"

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
        await _peek_devices(1, 1, room_id, client_ports, "idle")
        send_alone = []
        for _ in range(SEND_ALONE):
            sent_at = time.perf_counter()
            send_alone.append(
                await _answered(testbed, destination, _send(testbed, room_id), sent_at)
            )
        polls = await _peek_devices(16, devices, room_id, client_ports, "u")
        send_fanning: list[float] = []
        send_answers, answered = trio.open_memory_channel[float](rounds)
        event: dict[str, str] = {}

        async def trigger() -> float:
            fired_at = time.perf_counter()
            event["id"] = _send(testbed, room_id)
            nursery.start_soon(note_answer, event["id"], fired_at)
            return fired_at

        async def note_answer(event_id: str, sent_at: float) -> None:
            await send_answers.send(await _answered(testbed, destination, event_id, sent_at))

        async def after_round() -> None:  # the next round's polls wait for this /send answer
            with trio.fail_after(30):
                send_fanning.append(await answered.receive())

        def follow(poll: Poll, body: bytes) -> Poll:
            answer = json.loads(body)
            events = answer["rooms"]["peek"][room_id]["timeline"]["events"]
            assert [e["event_id"] for e in events] == [event["id"]], body[:300]
            target = re.sub(r"since=[^&]*", f"since={quote(answer['next_batch'])}", poll[1])
            return (poll[0], target, poll[2])

        pids = [process.pid for process in processes]
        latencies = await fan_out_rounds(polls, rounds, trigger, follow, pids, after_round)
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
        nursery.cancel_scope.cancel()
    for process in processes:
        process.terminate()
        await process.wait()
    return PeekproxyRun(latencies, sorted(send_alone), sorted(send_fanning))


#: The servers measured beside peekproxy, in the order of the output.
_FLOOR_KINDS = list(FLOORS)
_SYNAPSE = "synapse"


def _row(name: str, latencies: list[float], what: str, width: int) -> str:
    p50, p99, worst = summary(latencies)
    shown = f"p50 {p50:7.1f} ms, p99 {p99:7.1f} ms, max {worst:7.1f} ms"
    return f"  {name + ':':<{width}} {shown}  ({what})"


def _ms(figures: list[float]) -> str:
    p50, p99, worst = summary(figures)
    return f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {worst:.1f} ms"


async def one_count(
    devices: int,
    rounds: int,
    directory: Path,
    setups: list[Setup],
    dsn: str | None,
    synapse: SynapseRoom | None,
) -> dict[str, float]:
    """Every server at ``devices`` devices, ``rounds`` fan-outs each: prints the figures,
    returns each server's p99 (ms) by name (peekproxy's by its setup's label)."""
    print(
        f"fan-out: {devices} devices long-polling one room, {rounds} rounds of one event "
        f"({devices * rounds} answers pooled per server)",
        flush=True,
    )
    ours: list[tuple[Setup, PeekproxyRun]] = []
    for n, setup in enumerate(setups):
        print(f" peekproxy ({setup.label}):", flush=True)
        own_dsn = None
        if setup.backend == "postgres":
            assert dsn is not None
            own_dsn = await trio.to_thread.run_sync(_fresh_database, dsn, f"{devices}_{n}")
        run = await fanout(devices, rounds, directory / f"{devices}-{n}", setup, own_dsn)
        ours.append((setup, run))
    others: dict[str, list[float]] = {}
    for kind in _FLOOR_KINDS:
        print(f" {FLOORS[kind]}:", flush=True)
        others[FLOORS[kind]] = await floor(kind, free_port(), devices, rounds)
    if synapse is not None:
        print(" synapse:", flush=True)
        others[_SYNAPSE] = await synapse_fan_out(synapse, devices, rounds)
    what = {
        FLOORS["trio-h11"]: "trio + h11 alone, one process, a canned answer of the same size",
        FLOORS["bare-hypercorn"]: "hypercorn + a bare ASGI app, one process, the same answer",
        _SYNAPSE: "one user on N devices long-polling a joined room, one event sent",
    }
    names = [f"peekproxy ({setup.label})" for setup, _ in ours] + list(others)
    width = max(len(name) for name in names) + 1
    print(f" {devices} devices, latency from the event sent until each answer arrived:")
    for (_, run), name in zip(ours, names, strict=False):
        print(_row(name, run.latencies, "event -> /send -> store -> every device", width))
    for name, latencies in others.items():
        print(_row(name, latencies, what[name], width))
    for setup, run in ours:
        alone, fanning = summary(run.send_alone)[1], summary(run.send_fanning)[1]
        print(
            f"  /send answer ({setup.label}): no devices {_ms(run.send_alone)}; "
            f"with {devices} devices {_ms(run.send_fanning)}"
        )
        print(
            f"  send answer p99: with {devices} devices {fanning:.1f} ms, no devices "
            f"{alone:.1f} ms, difference {fanning - alone:.1f} ms (goal <= 50 ms: "
            f"{'PASS' if fanning - alone <= 50 else 'ABOVE GOAL'})"
        )
    p99s = {setup.label: summary(run.latencies)[1] for setup, run in ours}
    p99s.update({name: summary(latencies)[1] for name, latencies in others.items()})
    return p99s


def _ratio_lines(devices: int, setups: list[Setup], p99s: dict[str, float]) -> list[str]:
    """The p99 ratios of every peekproxy setup at one count, with the goals' verdicts."""
    lines = []
    for setup in setups:
        ours = p99s[setup.label]
        parts = []
        for name, goal in [
            (FLOORS["trio-h11"], 1.5),
            (FLOORS["bare-hypercorn"], None),
            (_SYNAPSE, 0.1),
        ]:
            if name not in p99s:
                continue
            ratio = ours / p99s[name]
            verdict = (
                ""
                if goal is None
                else f" (goal <= {goal}: {'PASS' if ratio <= goal else 'MISSED'})"
            )
            parts.append(f"peekproxy/{name} {ratio:.2f}{verdict}")
        lines.append(f"  {devices} devices, {setup.label}: " + ", ".join(parts))
    return lines


async def fan_out_figures(
    counts: list[int],
    rounds: int,
    directory: Path,
    setups: list[Setup],
    dsn: str | None,
    synapse: Synapse | None,
) -> None:
    """Every server at every count of ``counts`` (ascending), then the ratios; the last
    lines are the ratios at the largest count (peekproxy: the first setup)."""
    room = None if synapse is None else await prepare_room(synapse)
    figures = {}
    for devices in sorted(counts):
        figures[devices] = await one_count(devices, rounds, directory, setups, dsn, room)
    print("ratios of p99 (goals: <= 1.5 to the trio-h11 floor, <= 0.1 to Synapse):")
    for devices, p99s in figures.items():
        print("\n".join(_ratio_lines(devices, setups, p99s)))
    last = figures[max(counts)]
    ours = last[setups[0].label]
    print(f"ratio p99 peekproxy/{FLOORS['trio-h11']}: {ours / last[FLOORS['trio-h11']]:.2f}")
    if _SYNAPSE in last:
        print(f"ratio p99 peekproxy/synapse: {ours / last[_SYNAPSE]:.3f}")


def _fresh_database(dsn: str, suffix: str) -> str:
    """A new empty database beside the one of ``dsn`` (same cluster), named after it."""
    import psycopg

    name = f"{psycopg.conninfo.conninfo_to_dict(dsn)['dbname']}_{suffix}"
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


def _counts(text: str) -> list[int]:
    return [int(n) for n in text.split(",")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=_counts, default=[1000, 5000], help="e.g. 1000,5000")
    parser.add_argument("--rounds", type=int, default=5, help="fan-outs per server and count")
    parser.add_argument("--rooms", type=int, default=10_000)
    parser.add_argument("--peeks", type=int, default=100_000)
    parser.add_argument(
        "--instances",
        type=_counts,
        default=[1],
        help="comma-separated process counts for the fan-out, e.g. 1,2 (N > 1: PostgreSQL)",
    )
    parser.add_argument("--backend", default="sqlite", choices=BACKENDS)
    parser.add_argument("--synapse", action="store_true", help="measure a real Synapse too")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory part")
    args = parser.parse_args()
    raise_fd_limit()
    setups = _setups(args.instances, args.backend)
    if not args.no_memory:
        memory_figures(args.rooms, args.peeks, backends_of(args.backend))
    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fanout-")))
        dsn = None
        if any(setup.backend == "postgres" for setup in setups):
            dsn = stack.enter_context(throwaway_database())
        synapse = None
        if args.synapse:
            where = directory / "synapse"
            synapse = stack.enter_context(
                running_synapse(trustme.CA(), where, log=log_config(where))
            )
        trio.run(fan_out_figures, args.devices, args.rounds, directory, setups, dsn, synapse)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

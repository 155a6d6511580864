"""The client side of bench/fanout.py: one thin h11 client for every server measured.

A *poll* is ``(port, target, headers)``: one ``GET target`` on 127.0.0.1:port over its own
HTTP/1.1 connection. :func:`fan_out_rounds` parks every poll, fires one trigger (an event
sent, a ``/go`` request), waits for every answer and does it again ``rounds`` times, each
round a fresh set of long-polls made from the previous round's answers (a ``since`` token).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import h11
import trio

__all__ = [
    "Poll",
    "fan_out_rounds",
    "long_poll",
    "quiet",
    "raise_fd_limit",
    "summary",
    "time_fan_out",
]

#: Connections being opened (connect and request written) at once, for every server alike.
OPENING = 32

#: ``(port, target, headers)``: one long-poll, ``GET target`` on 127.0.0.1:port.
Poll = tuple[int, str, list[tuple[str, str]]]


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (processes started after
    inherit it: thousands of parked connections need one descriptor each, on both sides);
    returns the new soft limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def long_poll(
    port: int,
    target: str,
    headers: list[tuple[str, str]],
    sent: Callable[[], None] = lambda: None,
    opening: trio.CapacityLimiter | None = None,
) -> tuple[int, bytes]:
    """One HTTP/1.1 GET on its own connection, parsed with h11: (status, body); ``sent`` is
    called once the request is written. While it connects and writes the request it holds
    ``opening`` (so a server with a short listen backlog, Synapse's is 50, is not sent
    thousands of connections at once). A client this thin keeps the figure about the
    server, not about client-side overhead.

    Raises:
        RuntimeError: the server closed the connection before the response ended.
    """
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=target, headers=[("host", "peekproxy"), *headers])
    async with opening or _no_limit():
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            await stream.send_all(connection.send(request) + connection.send(h11.EndOfMessage()))
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    sent()
    async with stream:
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


@contextlib.asynccontextmanager
async def _no_limit() -> AsyncIterator[None]:
    yield


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


async def quiet(pids: list[int], limit: float = 60) -> None:
    """Wait (at least 0.5 s, at most ``limit`` s) until the processes ``pids`` together
    used under 5% of a core for 0.5 s: every parked request has been read and waits."""
    tick = os.sysconf("SC_CLK_TCK")
    with trio.move_on_after(limit):
        while True:
            before = sum(_cpu_ticks(pid) for pid in pids)
            await trio.sleep(0.5)
            if (sum(_cpu_ticks(pid) for pid in pids) - before) / tick < 0.025:
                return


async def time_fan_out(
    polls: list[Poll],
    trigger: Callable[[], Awaitable[float]],
    servers: list[int],
    cpu: list[float] | None = None,
) -> list[tuple[float, bytes]]:
    """Park every long-poll, wait until the server processes ``servers`` (PIDs) are
    quiet (:func:`quiet`: every request has reached its server and parked), then call
    ``trigger`` (it returns the ``time.perf_counter()`` moment it fired) and wait
    for all: ``(latency after that moment in ms, body)`` per poll, in the order of ``polls``.
    ``cpu`` (if given) gets the CPU seconds the server processes used from the trigger
    until the last answer: what a fan-out costs the server, whatever else runs beside it.

    Raises:
        RuntimeError: a poll answered with a status other than 200.
    """
    answered: list[tuple[float, bytes]] = [(0.0, b"")] * len(polls)
    opening = trio.CapacityLimiter(OPENING)
    sent = [0]
    all_sent = trio.Event()

    def one_sent() -> None:
        sent[0] += 1
        if sent[0] == len(polls):
            all_sent.set()

    async def one(index: int, port: int, target: str, headers: list[tuple[str, str]]) -> None:
        status, body = await long_poll(port, target, headers, one_sent, opening)
        answered[index] = (time.perf_counter(), body)
        if status != 200:
            raise RuntimeError(f"long-poll answered {status}: {body[:200]!r}")

    async with trio.open_nursery() as nursery:
        for index, poll in enumerate(polls):
            nursery.start_soon(one, index, *poll)
        await all_sent.wait()
        await quiet(servers)
        if os.environ.get("FANOUT_PAUSE"):  # time to attach a profiler
            await trio.sleep(float(os.environ["FANOUT_PAUSE"]))
        ticks = sum(_cpu_ticks(pid) for pid in servers)
        fired_at = await trigger()
    if cpu is not None:
        used = sum(_cpu_ticks(pid) for pid in servers) - ticks
        cpu.append(used / os.sysconf("SC_CLK_TCK"))
    return [((at - fired_at) * 1000, body) for at, body in answered]


async def fan_out_rounds(
    polls: list[Poll],
    rounds: int,
    trigger: Callable[[], Awaitable[float]],
    follow: Callable[[Poll, bytes], Poll],
    servers: list[int],
    after_round: Callable[[], Awaitable[None]] | None = None,
) -> list[float]:
    """``rounds`` fan-outs (:func:`time_fan_out`), each round's polls made by ``follow(poll,
    body)`` from the previous round's (it checks the answer and raises if it is wrong), after
    ``after_round()`` returned (say, the trigger's own answer arrived): every answer's
    latency in ms, all rounds pooled, sorted."""
    latencies: list[float] = []
    cpu: list[float] = []
    for n in range(rounds):
        answers = await time_fan_out(polls, trigger, servers, cpu)
        latencies += [latency for latency, _ in answers]
        polls = [follow(poll, body) for poll, (_, body) in zip(polls, answers, strict=True)]
        if after_round is not None:
            await after_round()
        worst = max(latency for latency, _ in answers)
        print(
            f"  round {n + 1}: {len(polls)} long-polls answered, the last after {worst:.1f} ms, "
            f"server CPU {cpu[-1] * 1e6 / len(polls):.0f} us per answer",
            flush=True,
        )
    print(
        f"  server CPU per answer, all rounds: {sum(cpu) * 1e6 / (len(polls) * rounds):.0f} us "
        "(the server processes' CPU from the trigger to the last answer; the h11 client's "
        "own CPU is not in it)",
        flush=True,
    )
    return sorted(latencies)


def summary(latencies: list[float]) -> tuple[float, float, float]:
    """``(p50, p99, max)`` of sorted ``latencies`` (nearest-rank p99)."""
    p99 = latencies[max(0, math.ceil(len(latencies) * 0.99) - 1)]
    return statistics.median(latencies), p99, latencies[-1]

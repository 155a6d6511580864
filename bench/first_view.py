"""Benchmark: how soon a peeking device first sees a big room (issue 13, observer join).

Two real Synapses, A and B, federating over TLS (one CA), peekproxy with ``[peeks] fallback =
"observer_join"`` (``observer_linger`` 0, so the observer leaves as soon as nobody peeks), and
an in-process testbed (MSC2444). A hosts a world_readable room with ``--members`` members (all
of A) and some messages; the testbed hosts a room of the same size. Each round measures, in
this order:

(a) **observer join**: a fresh device of peekproxy's delegation API peeks the room on A (by
    room ID): the time from the peek request to the first ``/_peekproxy/v1/sync`` answer
    showing the room in ``rooms.peek`` with state (``m.room.create``) and a timeline. peekproxy
    is not in the room: the request makes it join (make_join, send_join, checks);
(b) **Synapse join**, the peer: a fresh user of B joins the same room (``POST /join``, a remote
    join to A): the time until B's first ``/sync`` (lazy-loading members, as Element does)
    showing the room in ``rooms.join`` with state and a timeline;
(c) **MSC2444 peek**: a fresh device peeks the testbed room: the request to the first sync
    showing it;
(d) **the floor of a join**: what Synapse A alone needs to let a server in: ``make_join`` and
    ``send_join`` (v2, full state) of another user of peekproxy's server name, signed, with
    nothing checked or stored. No observer join can be faster than this; ``floor/synapse-join``
    says how far below B's own join any observer join could get.

Between rounds the device unpeeks (the observer leaves A, the remote peek is DELETEd) and B's
user leaves and forgets the room (B is no longer in it), so every round starts cold.
Medians over ``--rounds``. Goal: observer join / Synapse join ≤ 0.2.

Usage: ``.venv/bin/python bench/first_view.py [--members 200] [--rounds 5]``; needs Synapse in
./.synapse-venv. The last line is ``ratio first view observer-join/synapse-join: X``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peekproxy.core.membership import membership_event
from peekproxy.demo import (
    free_port,
    start_loopback_testbed,
    start_peekproxy,
    write_loopback_tls,
    write_peekproxy_config,
)
from peekproxy.federation.client import FederationClient, path_segment
from peekproxy.federation.signing_key import load_signing_key
from peekproxy.services.msc2444 import SUPPORTED_VERSIONS
from tests.peer import loopback_client
from tests.synapse import Synapse, running_synapse

SECRET = "bench-secret"
PASSWORD = "bench-password"
MESSAGES = 20
#: Most requests in flight at once while the room fills (registrations, joins).
PARALLEL = 8
#: Element's filter: members of the timeline's senders only.
LAZY = json.dumps({"room": {"state": {"lazy_load_members": True}}})
DEADLINE_S = 120.0

Json = dict[str, Any]
#: One first view, in seconds from the request: (the request answered, the sync showing it).
View = tuple[float, float]
#: (d)'s client signing as peekproxy's server name, its user, that server name and key.
Floor = tuple[FederationClient, str, str, Any]


class Bench:
    """The running parts and an HTTP client."""

    def __init__(self, http: httpx.AsyncClient, a: Synapse, b: Synapse, peekproxy: str) -> None:
        self.http, self.a, self.b = http, a, b
        self.delegation = f"{peekproxy}/_peekproxy/v1"
        self.secret = {"Authorization": f"Bearer {SECRET}"}

    async def register(self, synapse: Synapse, name: str) -> str:
        """A new user of ``synapse``; returns its access token."""
        response = await self.http.post(
            f"{synapse.client}/_matrix/client/v3/register",
            json={"username": name, "password": PASSWORD, "auth": {"type": "m.login.dummy"}},
        )
        response.raise_for_status()
        token: str = response.json()["access_token"]
        return token

    async def client(
        self, synapse: Synapse, token: str, method: str, path: str, body: Any = None
    ) -> Json:
        response = await self.http.request(
            method,
            f"{synapse.client}/_matrix/client/v3{path}",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        )
        if response.status_code != 200:
            raise RuntimeError(f"{method} {path} on {synapse.server_name}: {response.text}")
        answer: Json = response.json()
        return answer

    async def fill_room(self, members: int) -> tuple[str, str]:
        """A world_readable room on A with ``members`` members (the creator among them) and
        :data:`MESSAGES` messages: (room ID, creator's token)."""
        owner = await self.register(self.a, "owner")
        created = await self.client(
            self.a,
            owner,
            "POST",
            "/createRoom",
            {
                "preset": "public_chat",
                "name": "Big room",
                "room_alias_name": "big",
                "initial_state": [
                    {
                        "type": "m.room.history_visibility",
                        "state_key": "",
                        "content": {"history_visibility": "world_readable"},
                    }
                ],
            },
        )
        room_id: str = created["room_id"]
        limit = trio.CapacityLimiter(PARALLEL)

        async def member(n: int) -> None:
            async with limit:
                token = await self.register(self.a, f"member{n}")
                await self.client(self.a, token, "POST", f"/join/{quote(room_id, safe='')}", {})

        async with trio.open_nursery() as nursery:
            for n in range(members - 1):
                nursery.start_soon(member, n)
        for n in range(MESSAGES):
            await self.client(
                self.a,
                owner,
                "PUT",
                f"/rooms/{quote(room_id, safe='')}/send/m.room.message/m{n}",
                {"msgtype": "m.text", "body": f"message {n}"},
            )
        return room_id, owner

    # -- the three first views --------------------------------------------------------------

    async def peek_view(self, room_id: str, device: str, hints: list[str]) -> View:
        """(a)/(c): a delegation-API peek of ``room_id`` by a fresh device, until its sync
        shows the room."""
        params = {"user_id": "@bench:localhost", "device_id": device}
        started = time.perf_counter()
        response = await self.http.post(
            f"{self.delegation}/peek/{quote(room_id, safe='')}",
            params=[*params.items(), *(("server_name", h) for h in hints)],
            json={},
            headers=self.secret,
        )
        if response.status_code != 200:
            raise RuntimeError(f"peek of {room_id}: {response.status_code} {response.text}")
        answered = time.perf_counter() - started

        async def sync(since: str | None) -> Json:
            query = params | {"timeout": "30000"} | ({"since": since} if since else {})
            answer = await self.http.get(
                f"{self.delegation}/sync", params=query, headers=self.secret
            )
            answer.raise_for_status()
            body: Json = answer.json()
            return body

        await _until(sync, lambda body: _shows(body, "peek", room_id))
        return answered, time.perf_counter() - started

    async def unpeek(self, room_id: str, device: str) -> None:
        response = await self.http.post(
            f"{self.delegation}/rooms/{quote(room_id, safe='')}/unpeek",
            params={"user_id": "@bench:localhost", "device_id": device},
            json={},
            headers=self.secret,
        )
        response.raise_for_status()

    async def synapse_view(self, room_id: str, token: str) -> View:
        """(b): B's fresh user joins ``room_id`` (a remote join to A) until B's sync shows it
        in ``rooms.join``."""
        filtered = {"filter": LAZY, "timeout": "0"}
        first = await self.client(self.b, token, "GET", "/sync?" + _query(filtered))
        since: str = first["next_batch"]
        started = time.perf_counter()
        path = f"/join/{quote(room_id, safe='')}?server_name={quote(self.a.server_name)}"
        await self.client(self.b, token, "POST", path, {})
        answered = time.perf_counter() - started

        async def sync(since_now: str | None) -> Json:
            query = filtered | {"timeout": "30000", "since": since_now or since}
            return await self.client(self.b, token, "GET", "/sync?" + _query(query))

        await _until(sync, lambda body: _shows(body, "join", room_id))
        return answered, time.perf_counter() - started

    async def wait_left(self, room_id: str, owner: str, user_id: str) -> None:
        """Poll A until ``user_id``'s membership in ``room_id`` is ``leave``."""
        path = f"/rooms/{quote(room_id, safe='')}/state/m.room.member/{quote(user_id, safe='')}"
        with trio.fail_after(DEADLINE_S):
            while True:
                answer = await self.client(self.a, owner, "GET", path)
                if answer.get("membership") == "leave":
                    return
                await trio.sleep(0.05)


def _query(params: dict[str, str]) -> str:
    return "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())


def _shows(body: Json, section: str, room_id: str) -> bool:
    """The sync answer shows ``room_id`` in ``rooms.<section>`` with its create event (state
    or timeline) and a non-empty timeline."""
    room = body.get("rooms", {}).get(section, {}).get(room_id)
    if room is None:
        return False
    timeline = room.get("timeline", {}).get("events", [])
    events = [*room.get("state", {}).get("events", []), *timeline]
    return bool(timeline) and any(e.get("type") == "m.room.create" for e in events)


async def _until(
    sync: Callable[[str | None], Awaitable[Json]], shown: Callable[[Json], bool]
) -> None:
    """Sync (the first time without ``since``) until ``shown(answer)``."""
    since: str | None = None
    with trio.fail_after(DEADLINE_S):
        while True:
            body = await sync(since)
            if shown(body):
                return
            since = body["next_batch"]


async def one_round(
    run: Bench,
    n: int,
    room_id: str,
    owner: str,
    observer: str,
    testbed: Any,
    testbed_room: str,
    floor: Floor,
) -> dict[str, View]:
    """Round ``n``: (a), (b), (c) and (d), each put back as it was after."""
    figures = {"observer": await run.peek_view(room_id, f"ROUND{n}", [run.a.server_name])}
    await run.unpeek(room_id, f"ROUND{n}")
    await run.wait_left(room_id, owner, observer)

    token = await run.register(run.b, f"joiner{n}")
    figures["synapse"] = await run.synapse_view(room_id, token)
    for action in ("leave", "forget"):
        await run.client(run.b, token, "POST", f"/rooms/{quote(room_id, safe='')}/{action}", {})

    figures["msc2444"] = await run.peek_view(testbed_room, f"TB{n}", [testbed.server_name])
    await run.unpeek(testbed_room, f"TB{n}")
    await testbed.wait_until(lambda: sum(e[0] == "delete" for e in testbed.peek_log) > n)

    figures["floor"] = await floor_view(floor, run.a.server_name, room_id)
    return figures


async def _membership(floor: Floor, server: str, room_id: str, membership: str) -> None:
    """make_X + send_X (v2) of ``floor``'s user, nothing checked: X is join or leave."""
    client, user, name, key = floor
    room = path_segment(room_id)
    make = f"/_matrix/federation/v1/make_{membership}/{room}/{path_segment(user)}"
    template = await client.get_json(server, make, query={"ver": SUPPORTED_VERSIONS})
    event_id, pdu = membership_event(
        template, room_id=room_id, user_id=user, membership=membership, server_name=name,
        signing_key=key, now_ms=int(time.time() * 1000),
    )  # fmt: skip
    send = f"/_matrix/federation/v2/send_{membership}/{room}/{path_segment(event_id)}"
    await client.put_json(server, send, pdu)


async def floor_view(floor: Floor, server: str, room_id: str) -> View:
    """(d): the join alone, timed; then the leave, not timed."""
    started = time.perf_counter()
    await _membership(floor, server, room_id, "join")
    elapsed = time.perf_counter() - started
    await _membership(floor, server, room_id, "leave")
    return elapsed, elapsed


async def bench(members: int, rounds: int, directory: Path) -> float:
    ca = trustme.CA()
    tls = write_loopback_tls(directory, ca)
    pp_port, tb_port, client_port = free_port(), free_port(), free_port()
    config = write_peekproxy_config(
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
        "PEEKPROXY_PEEKS__FALLBACK": "observer_join",
        "PEEKPROXY_PEEKS__OBSERVER_LINGER": "0",
        "PEEKPROXY_PEEKS__LINGER": "0",
    }
    times: dict[str, list[View]] = {"observer": [], "synapse": [], "msc2444": [], "floor": []}
    name = f"localhost:{pp_port}"
    key = load_signing_key(directory / "peekproxy" / "signing.key")
    floor = (loopback_client(tls.ca_file, name, key), f"@floor:{name}", name, key)
    with ExitStack() as stack:
        a = stack.enter_context(running_synapse(ca, directory / "synapse-a"))
        b = stack.enter_context(running_synapse(ca, directory / "synapse-b"))
        async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=DEADLINE_S) as http:
            process = await start_peekproxy(nursery, config, env)
            testbed, testbed_room = await start_loopback_testbed(
                nursery, port=tb_port, tls=tls, data_dir=directory / "testbed", room_version="10"
            )
            try:
                for n in range(members - 1):
                    testbed.membership(testbed_room, f"member{n}", "join")
                for n in range(MESSAGES):
                    content = {"msgtype": "m.text", "body": f"message {n}"}
                    testbed.send(
                        testbed_room, sender="admin", type="m.room.message", content=content
                    )
                run = Bench(http, a, b, f"http://127.0.0.1:{client_port}")
                started = time.perf_counter()
                room_id, owner = await run.fill_room(members)
                print(
                    f"room on Synapse A with {members} members and {MESSAGES} messages "
                    f"filled in {time.perf_counter() - started:.1f} s",
                    flush=True,
                )
                for n in range(rounds):
                    figures = await one_round(
                        run, n, room_id, owner, f"@peekproxy:localhost:{pp_port}", testbed,
                        testbed_room, floor,
                    )  # fmt: skip
                    for name, view in figures.items():
                        times[name].append(view)
                    shown = ", ".join(f"{k} {v[1] * 1000:.0f} ms" for k, v in figures.items())
                    print(f"round {n + 1}: {shown}", flush=True)
            finally:
                process.terminate()
                await process.wait()
                nursery.cancel_scope.cancel()
    return _report(members, rounds, times)


def _report(members: int, rounds: int, times: dict[str, list[View]]) -> float:
    answered = {k: statistics.median(v[0] for v in views) * 1000 for k, views in times.items()}
    median = {k: statistics.median(v[1] for v in views) * 1000 for k, views in times.items()}
    print(f"first view of a room with {members} members, median of {rounds} rounds:")
    for name, what, request in (
        ("observer", "observer join (peekproxy, room on Synapse A)", "peek"),
        ("synapse", "Synapse B's own remote join (lazy members)", "join"),
        ("msc2444", "MSC2444 peek (peekproxy, testbed room)", "peek"),
        ("floor", "floor: Synapse A's make_join + send_join alone", "join"),
    ):
        print(
            f"  {what:45} {median[name]:8.1f} ms  ({request} request answered at "
            f"{answered[name]:.1f} ms)"
        )
    print(
        f"ratio first view msc2444-peek/synapse-join: {median['msc2444'] / median['synapse']:.3f}"
    )
    print(f"ratio floor (join alone)/synapse-join: {median['floor'] / median['synapse']:.3f}")
    print(f"ratio first view observer-join/floor: {median['observer'] / median['floor']:.3f}")
    ratio = median["observer"] / median["synapse"]
    print(f"ratio first view observer-join/synapse-join: {ratio:.3f}")
    return ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.members < 2 or args.rounds < 1:
        parser.error("--members must be at least 2 and --rounds at least 1")
    with tempfile.TemporaryDirectory() as directory:
        trio.run(bench, args.members, args.rounds, Path(directory))
    return 0


if __name__ == "__main__":
    sys.exit(main())

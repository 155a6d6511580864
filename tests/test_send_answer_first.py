"""Issue 17: a federation ``/send`` is answered before the long-polls it wakes. A homeserver
sends one transaction at a time per destination, so an answer queued behind thousands of
woken devices would cap a busy room's rate; the devices are woken once the answer is out
(peekproxy/services/notifier.py, ``Notifier.holding``)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import trio
import trustme

from tests.conftest import Spawn
from tests.peek_world import SECRET, TESTBED, build_world

DEVICES = 150


async def test_the_send_answer_goes_out_before_the_woken_long_polls(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    world = await build_world(
        nursery,
        tls_ca,
        tmp_path,
        spawn,
        peeks_env={
            "PEEKPROXY_PEEKS__RATE_LIMIT_BURST": str(DEVICES + 10),
            "PEEKPROXY_PEEKS__RATE_LIMIT_PER_SECOND": "1000",
        },
    )
    room_id = world.create_room("10")
    devices = [f"D{n}" for n in range(DEVICES)]
    tokens: dict[str, str] = {}
    for device in devices:
        response = await world.peek(room_id, device=device, hints=[TESTBED])
        assert response.status_code == 200, response.text
        tokens[device] = (await world.sync(device=device))["next_batch"]

    answered: dict[str, float] = {}
    event_id = ""

    async def long_poll(http: httpx.AsyncClient, device: str) -> None:
        response = await http.get(
            f"{world.daemon.client}/_peekproxy/v1/sync",
            params={
                "user_id": "@alice:peekproxy.test",
                "device_id": device,
                "since": tokens[device],
                "timeout": "30000",
            },
            headers={"Authorization": f"Bearer {SECRET}"},
        )
        answered[device] = time.perf_counter()
        events = response.json()["rooms"]["peek"][room_id]["timeline"]["events"]
        assert [e["event_id"] for e in events] == [event_id]

    limits = httpx.Limits(max_connections=DEVICES + 10)
    async with (
        httpx.AsyncClient(timeout=60, limits=limits) as http,
        trio.open_nursery() as polls,
    ):
        for device in devices:
            polls.start_soon(long_poll, http, device)
        with trio.fail_after(30):  # the daemon is a process: poll its gauge
            while True:
                metrics = (await http.get(f"{world.daemon.metrics}/metrics")).text
                parked = re.search(r'peekproxy_long_polls\{api="delegation"\} (\S+)', metrics)
                if parked and float(parked.group(1)) == DEVICES:
                    break
                await trio.sleep(0.05)
        event_id = world.send(room_id, "fan out")
        await world.wait_delivered(event_id)
        send_answered = time.perf_counter()
    before = sorted(d for d, t in answered.items() if t < send_answered)
    # Every device got the event; hardly any (the test's own loop may read a few answers
    # that arrived together first) before the testbed had its /send answer.
    assert len(answered) == DEVICES
    assert len(before) <= DEVICES // 20, (len(before), before[:10])

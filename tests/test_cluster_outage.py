"""PostgreSQL goes away under two real peekproxy processes (issue 16, docs/failure-modes.md):
``pg_ctl stop -m fast`` of the test's own cluster while devices sync, then ``pg_ctl start``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio
import trustme

from tests.cluster_world import build_cluster, put_transaction
from tests.conftest import Spawn
from tests.peek_world import PEEKPROXY, SECRET
from tests.pg_cluster import PgCluster
from tests.test_cluster import until
from tests.test_cluster_pg import BOB, _event_ids

ALICE = "@alice:peekproxy.test"
AUTH = {"Authorization": f"Bearer {SECRET}"}
#: The most an answer may take while the database is away (the brief: "promptly", ~2 s).
PROMPT_S = 2.0


async def _sync(
    via: str, user: str, since: str | None = None, timeout_ms: int = 0
) -> tuple[int, dict[str, Any], float]:
    """(status, body, seconds taken) of a delegation /sync, whatever the status."""
    params = {"user_id": user, "device_id": "D1", "timeout": str(timeout_ms)}
    params |= {"since": since} if since else {}
    start = time.monotonic()
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.get(f"{via}/_peekproxy/v1/sync", params=params, headers=AUTH)
    return response.status_code, response.json(), time.monotonic() - start


async def _peek(via: str, user: str, room_id: str) -> tuple[int, dict[str, Any], float]:
    start = time.monotonic()
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(
            f"{via}/_peekproxy/v1/peek/{quote(room_id, safe='')}",
            params={"user_id": user, "device_id": "D1"},
            json={},
            headers=AUTH,
        )
    return response.status_code, response.json(), time.monotonic() - start


async def test_postgresql_stopped_and_started_under_two_instances(
    nursery: trio.Nursery,
    tls_ca: trustme.CA,
    tmp_path: Path,
    spawn: Spawn,
    own_pg_cluster: PgCluster,
) -> None:
    dsn = own_pg_cluster.new_database()
    cluster = await build_cluster(nursery, tls_ca, tmp_path, spawn, dsn, delivered_to=1)
    world, a, b = cluster.world, cluster.client(0), cluster.client(1)
    room_id = world.create_room()
    assert (await world.peek(room_id, via=a)).status_code == 200
    assert (await world.peek(room_id, user=BOB, via=b)).status_code == 200
    before = world.send(room_id, "acknowledged before the outage")
    await world.wait_delivered(before)
    alice_seen: list[str] = []
    answer = await world.sync(via=a)
    alice_seen += _event_ids(answer, room_id)
    alice_since = answer["next_batch"]
    bob_since = (await world.sync(user=BOB, via=b))["next_batch"]
    assert before in alice_seen

    # Load: Bob long-polls (2 s) on B over and over, before, during and after the stop.
    statuses: list[tuple[int, float]] = []
    load_done = trio.Event()

    async def load(via: str, user: str, since: str) -> None:
        while not load_done.is_set():
            status, body, took = await _sync(via, user, since, timeout_ms=2_000)
            statuses.append((status, took))
            if status == 200:
                since = body["next_batch"]

    async with trio.open_nursery() as loads:
        loads.start_soon(load, b, BOB, bob_since)
        await trio.sleep(0.3)  # the long-polls wait
        await trio.to_thread.run_sync(own_pg_cluster.pg_ctl, "stop", "-m", "fast")

        # Requests answer 503 M_UNKNOWN promptly; a /sync with a since token is empty.
        figures: dict[str, float] = {}
        status, body, figures["peek"] = await _peek(a, "@carol:peekproxy.test", room_id)
        assert (status, body["errcode"]) == (503, "M_UNKNOWN"), body
        status, body, figures["initial sync"] = await _sync(b, "@carol:peekproxy.test")
        assert (status, body["errcode"]) == (503, "M_UNKNOWN"), body
        status, body, figures["sync since"] = await _sync(a, ALICE, alice_since)
        assert status == 200 and body["next_batch"] == alice_since, body
        assert not _event_ids(body, room_id)
        status, body, figures["long-poll since"] = await _sync(a, ALICE, alice_since, 1_000)
        assert status == 200 and not _event_ids(body, room_id), body
        async with httpx.AsyncClient(timeout=60) as http:
            start = time.monotonic()
            ready = await http.get(f"{a}/ready")
            figures["ready"] = time.monotonic() - start
        print("while PostgreSQL is stopped:", {k: f"{v:.2f} s" for k, v in figures.items()})
        assert ready.status_code == 503

        # Federation /send is not acknowledged: the testbed retries it.
        during = world.send(room_id, "sent while the database is away")
        sender = world.testbed.senders[PEEKPROXY]

        async def refused() -> bool:
            return sender.sending is not None and sender.sending.attempts >= 2

        await until(refused, timeout_s=15)
        assert not world.delivered(during)
        pdu = world.testbed.room(room_id).event(during)
        assert pdu is not None
        refused_put = await put_transaction(world, cluster.daemons[1].federation, "t1", [pdu])
        assert (refused_put.status_code, refused_put.json()["errcode"]) == (503, "M_UNKNOWN")
        load_done.set()
    # The long-polls with a since token under way when it stopped, and during: valid answers.
    assert statuses and all(status == 200 for status, _ in statuses), statuses
    assert max(took for _, took in statuses) < 2.0 + PROMPT_S, statuses  # at their timeout
    assert max(figures.values()) < PROMPT_S, figures

    await trio.to_thread.run_sync(own_pg_cluster.pg_ctl, "start")
    restarted = time.monotonic()
    with trio.fail_after(60):
        await world.wait_delivered(during)  # the retry after the restart is acknowledged
    print(f"/send acknowledged {time.monotonic() - restarted:.2f} s after the restart")

    # Each instance reconnects by itself, the LISTEN connection too: a long-poll on A wakes
    # for an event delivered to B.
    async def a_answers() -> bool:
        return (await _sync(a, ALICE, alice_since))[0] == 200

    await until(a_answers, timeout_s=30)
    after = world.send(room_id, "after the restart")
    with trio.fail_after(60):
        while after not in alice_seen:
            status, body, took = await _sync(a, ALICE, alice_since, timeout_ms=30_000)
            assert status == 200, body
            alice_seen += _event_ids(body, room_id)
            alice_since = body["next_batch"]
    assert took < 15, took  # woken, not answered at the poll's timeout
    # Nothing acknowledged before the outage is lost; the retried /send is stored once.
    assert [e for e in alice_seen if e in (before, during, after)] == [before, during, after]
    rows = cluster.rows("SELECT count(*) FROM room_stream WHERE event_id = ?", during)
    assert rows == [(1,)]

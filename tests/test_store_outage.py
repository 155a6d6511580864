"""The database goes away (issue 16), end to end over real sockets: peekproxy runs in this
process (``run_daemon``) over a :class:`~tests.faulty_store.FaultyStorage`, the testbed as the
remote room host. While the store is down: requests answer ``503 M_UNKNOWN`` (client,
delegation, admin, federation ``/send`` unacknowledged), a ``/sync`` with a ``since`` token
answers nothing new, and the background tasks wait; once it is back everything goes on: the
sender's retried transaction is stored once, renewals go on, nothing ends the daemon."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio
import trustme
from prometheus_client import REGISTRY

import peekproxy.daemon
from peekproxy.outage import OUTAGE
from tests.faulty_store import FaultyStorage, InProcessDaemons
from tests.peek_world import PEEKPROXY, SECRET, TESTBED, PeekWorld, build_world
from tests.synapse import Synapse

AUTH = {"Authorization": f"Bearer {SECRET}"}
DEVICE = {"user_id": "@alice:peekproxy.test", "device_id": "D1"}
UNAVAILABLE = {"errcode": "M_UNKNOWN", "error": "the database is unavailable; retry later"}


@pytest.fixture
async def outage_world(
    nursery: trio.Nursery,
    tls_ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[PeekWorld]:
    daemons = InProcessDaemons(nursery)
    monkeypatch.setattr(peekproxy.daemon, "open_sqlite", daemons.open_sqlite)
    monkeypatch.setattr(OUTAGE, "since", None)
    world = await build_world(
        nursery,
        tls_ca,
        tmp_path,
        daemons.spawn,
        peeks_env={"PEEKPROXY_PEEKS__RENEWAL_INTERVAL_MAX": "1s"},
    )
    yield world
    for daemon in daemons.started:
        daemon.shutdown.set()


def store_of(world: PeekWorld) -> FaultyStorage:
    store: FaultyStorage = world.daemon.store  # type: ignore[attr-defined]
    return store


def sent_503() -> float:
    """``PUT`` requests answered 503 on the federation listener (this process's metrics)."""
    labels = {"listener": "federation", "method": "PUT", "code": "503"}
    return REGISTRY.get_sample_value("peekproxy_http_requests_total", labels) or 0.0


async def test_requests_answer_503_while_down_and_work_after(outage_world: PeekWorld) -> None:
    world = outage_world
    room_id = world.create_room("10")
    assert (await world.peek(room_id)).status_code == 200
    first = await world.sync()
    store = store_of(world)
    store.down = True
    async with httpx.AsyncClient(base_url=world.daemon.client, timeout=30) as http:
        answers = {
            "peek": await http.post(
                f"/_peekproxy/v1/peek/{room_id}", params=DEVICE, json={}, headers=AUTH
            ),
            "initial sync": await http.get("/_peekproxy/v1/sync", params=DEVICE, headers=AUTH),
            "messages": await http.get(
                f"/_peekproxy/v1/rooms/{room_id}/messages",
                params={**DEVICE, "dir": "b"},
                headers=AUTH,
            ),
            "admin": await http.get("/_peekproxy/v1/admin/subscriptions", headers=AUTH),
        }
        for name, response in answers.items():
            assert response.status_code == 503, (name, response.text)
            assert response.json() == UNAVAILABLE, name
            assert response.headers["Retry-After"] == "5", name
        ready = await http.get("/ready")
        assert ready.status_code == 503 and ready.json()["errcode"] == "M_UNKNOWN"
        # A sync with a since token that needs the store answers nothing new, its own token.
        full = await http.get(
            "/_peekproxy/v1/sync",
            params={**DEVICE, "since": first["next_batch"], "full_state": "true"},
            headers=AUTH,
        )
        assert full.status_code == 200, full.text
        assert full.json() == {
            "next_batch": first["next_batch"],
            "rooms": {"peek": {}, "leave": {}},
        }
        # A long-poll in flight through the outage ends with a valid answer, not an error.
        polled = await http.get(
            "/_peekproxy/v1/sync",
            params={**DEVICE, "since": first["next_batch"], "timeout": "300"},
            headers=AUTH,
        )
        assert polled.status_code == 200 and polled.json()["next_batch"] == first["next_batch"]
        store.down = False
        assert (await http.get("/ready")).status_code == 200
        again = await http.get(
            f"/_peekproxy/v1/rooms/{room_id}/messages", params={**DEVICE, "dir": "b"}, headers=AUTH
        )
        assert again.status_code == 200, again.text
    assert "room_id" in (await world.peek(room_id, device="D2")).json()


async def test_send_is_not_acknowledged_while_down_and_stored_once_after(
    outage_world: PeekWorld, caplog: pytest.LogCaptureFixture
) -> None:
    world = outage_world
    room_id = world.create_room("10")
    assert (await world.peek(room_id)).status_code == 200
    since = (await world.sync())["next_batch"]
    renewals = len(world.log_of("renew"))
    store = store_of(world)
    caplog.set_level(logging.INFO, logger="peekproxy.store")
    before = sent_503()
    store.down = True
    event_id = world.send(room_id, "during the outage")
    sender = world.testbed.senders[PEEKPROXY]
    # The sender was answered 503 (not acknowledged) and retries.
    await world.testbed.wait_until(
        lambda: sender.sending is not None and sender.sending.attempts >= 2
    )
    assert not world.delivered(event_id)
    assert sent_503() > before
    # The subscription task renews (the testbed sees it) but cannot store: it waits.
    await world.testbed.wait_until(lambda: len(world.log_of("renew")) > renewals)
    await trio.sleep(1.5)  # an outage longer than a renewal interval
    store.down = False
    await world.wait_delivered(event_id)
    bodies = [b for k, b in world.stream(room_id) if k == "event"]
    assert bodies.count("during the outage") == 1
    answer = await world.sync(since=since, timeout_ms=5000)
    timeline = answer["rooms"]["peek"][room_id]["timeline"]["events"]
    assert [e["content"]["body"] for e in timeline] == ["during the outage"]
    # Renewals go on after the outage, and are stored.
    after = len(world.log_of("renew"))
    await world.testbed.wait_until(lambda: len(world.log_of("renew")) >= after + 2)
    assert world.subscription(room_id)["state"] == "active"
    outage_lines = [r for r in caplog.records if "database is unavailable" in r.getMessage()]
    assert len(outage_lines) == 1 and outage_lines[0].levelno == logging.WARNING
    assert any("answers again" in r.getMessage() for r in caplog.records)
    assert TESTBED in world.subscription(room_id)["server"]


async def test_send_whose_record_cannot_be_written_is_retried_and_stored_once(
    outage_world: PeekWorld,
) -> None:
    """The transaction's events are stored but its idempotency record (the last write)
    fails: nothing is acknowledged, and the sender's retry stores nothing twice."""
    world = outage_world
    room_id = world.create_room("10")
    assert (await world.peek(room_id)).status_code == 200
    since = (await world.sync())["next_batch"]
    store = store_of(world)
    before = sent_503()
    store.fail_write = lambda fn: "_ingest_locked" in fn.__qualname__
    event_id = world.send(room_id, "record lost")
    sender = world.testbed.senders[PEEKPROXY]
    await world.testbed.wait_until(
        lambda: sender.sending is not None and sender.sending.attempts >= 2
    )
    assert sent_503() >= before + 2 and not world.delivered(event_id)
    assert [b for k, b in world.stream(room_id) if k == "event"].count("record lost") == 1
    store.fail_write = None
    await world.wait_delivered(event_id)
    assert [b for k, b in world.stream(room_id) if k == "event"].count("record lost") == 1
    answer = await world.sync(since=since, timeout_ms=5000)
    timeline = answer["rooms"]["peek"][room_id]["timeline"]["events"]
    assert [e["content"]["body"] for e in timeline] == ["record lost"]


async def test_front_mode_while_down(
    synapse: Synapse,
    nursery: trio.Nursery,
    tls_ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Front mode: the MSC2753 client routes answer 503; ``/sync`` is the homeserver's
    answer alone (a valid sync, never an error) until the store is back, then merged."""
    daemons = InProcessDaemons(nursery)
    monkeypatch.setattr(peekproxy.daemon, "open_sqlite", daemons.open_sqlite)
    world = await build_world(
        nursery,
        tls_ca,
        tmp_path,
        daemons.spawn,
        peeks_env={"PEEKPROXY_UPSTREAM__HOMESERVER_URL": synapse.client},
    )
    store = store_of(world)
    auth = {"Authorization": f"Bearer {synapse.register('outage-front')}"}
    room_id, other = world.create_room("10"), world.create_room("10")
    async with httpx.AsyncClient(base_url=world.daemon.client, timeout=60) as http:

        async def peek(room: str) -> httpx.Response:
            return await http.post(
                f"/_matrix/client/v3/peek/{quote(room, safe='')}",
                params={"server_name": TESTBED},
                json={},
                headers=auth,
            )

        async def sync(since: str | None, timeout_ms: int = 0) -> dict[str, Any]:
            params = {"timeout": str(timeout_ms), **({"since": since} if since else {})}
            response = await http.get("/_matrix/client/v3/sync", params=params, headers=auth)
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            return body

        assert (await peek(room_id)).status_code == 200
        since = (await sync(None))["next_batch"]
        store.down = True
        refused = await peek(other)
        assert refused.status_code == 503 and refused.json() == UNAVAILABLE
        during = await sync(since, timeout_ms=300)
        assert "next_batch" in during and room_id not in str(during.get("rooms", {}))
        store.down = False
        world.send(room_id, "after the outage")
        with trio.fail_after(30):
            while True:
                answer = await sync(since, timeout_ms=5000)
                since = answer["next_batch"]
                peeked = answer.get("rooms", {}).get("peek", {}).get(room_id)
                if peeked:
                    break
        bodies = [e["content"].get("body") for e in peeked["timeline"]["events"]]
        assert "after the outage" in bodies

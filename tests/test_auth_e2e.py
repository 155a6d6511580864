"""Issue 14 end to end: events the room's authorization rules reject never reach a peeking
device.

The testbed (a real federation server on loopback) relays, with its ``relay_illegal`` fault,
a message from a non-member, a power-levels change by a user without the level, a ban by a
user without the ban level and, in room version 12, a message whose ``auth_events`` cite
the create event: each correctly hashed and signed, so only the auth rules can catch it.
They reach peekproxy (a child process) every way a peer's events can: before the peek, so
through ``/backfill`` while a device pages back; live in ``/send`` transactions; and
withheld, so through ``get_missing_events``. Legal messages around them must all arrive, in
order; the illegal ones never show in ``/sync`` (timeline and state), ``/messages`` or
``/event``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio
import trustme

from tests.conftest import Spawn
from tests.peek_world import PEEKPROXY, SECRET, TESTBED, PeekWorld, build_world
from tests.testbed_support import admin

ALICE = "@alice:peekproxy.test"


@pytest.fixture
async def world(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> PeekWorld:
    return await build_world(nursery, tls_ca, tmp_path, spawn)


async def _device_get(world: PeekWorld, path: str, **params: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as http:
        return await http.get(
            f"{world.daemon.client}/_peekproxy/v1{path}",
            params={"user_id": ALICE, "device_id": "D1", **params},
            headers={"Authorization": f"Bearer {SECRET}"},
        )


class Relay:
    """The test's side of the testbed's admin API (over HTTP) for one room."""

    def __init__(self, http: httpx.AsyncClient, room_id: str) -> None:
        self.http, self.room = http, quote(room_id, safe="")
        self.legal: list[str] = []
        self.illegal: dict[str, str] = {}  # event ID → kind

    async def message(self, body: str, sender: str = "admin") -> str:
        sent = await self.http.post(
            f"/rooms/{self.room}/send", json={"sender": sender, "content": {"body": body}}
        )
        assert sent.status_code == 200, sent.text
        self.legal.append(sent.json()["event_id"])
        return str(sent.json()["event_id"])

    async def illegal_event(self, kind: str, sender: str | None = None) -> str:
        made = await self.http.post(
            f"/rooms/{self.room}/illegal", json={"kind": kind, "sender": sender}
        )
        assert made.status_code == 200, made.text
        self.illegal[made.json()["event_id"]] = kind
        return str(made.json()["event_id"])


async def _sync_until(world: PeekWorld, room_id: str, wanted: set[str]) -> list[dict[str, Any]]:
    """Incremental /syncs (long-polling) until the timeline holds ``wanted``; returns every
    timeline and state event seen."""
    seen: list[dict[str, Any]] = []
    since = None
    with trio.fail_after(60):
        while not wanted <= {e["event_id"] for e in seen}:
            body = await world.sync(since=since, timeout_ms=2000, limit=100)
            since = body["next_batch"]
            room = body["rooms"]["peek"].get(room_id, {})
            seen += room.get("timeline", {}).get("events", [])
            seen += room.get("state", {}).get("events", [])
    return seen


async def _page_back(world: PeekWorld, room_id: str, token: str) -> list[dict[str, Any]]:
    """Every event /messages gives paging back from ``token``, 2 at a time (so pages end
    next to the illegal events)."""
    events: list[dict[str, Any]] = []
    for _ in range(200):
        page = await _device_get(
            world, f"/rooms/{quote(room_id, safe='')}/messages", **{"from": token, "limit": "2"}
        )
        assert page.status_code == 200, page.text
        events += page.json()["chunk"]
        if "end" not in page.json():
            return events
        token = page.json()["end"]
    raise AssertionError("pagination did not end")


@pytest.mark.parametrize("version", ["10", "11", "12"])
async def test_illegal_events_never_reach_a_device(world: PeekWorld, version: str) -> None:
    room_id = world.create_room(version, name="Auth rules")
    async with admin(world.listening) as http:
        relay = Relay(http, room_id)
        assert (
            await http.post(f"/rooms/{relay.room}/members/join", json={"user": "bob"})
        ).is_success
        assert (await http.put("/faults", json={"relay_illegal": 1})).is_success
        # Before the peek: peekproxy meets this one through /backfill.
        await relay.message("old 1")
        backfilled = await relay.illegal_event("non_member_message")
        await relay.message("old 2")

        assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200

        # Live, in /send transactions.
        await relay.message("m1")
        await relay.illegal_event("non_member_message")
        await relay.message("m2")
        await relay.illegal_event("power_levels", "bob")
        await relay.message("m3")
        # Withheld: the next message names it in prev_events, so peekproxy asks the
        # testbed's get_missing_events for it.
        assert (await http.put("/faults", json={"withhold_next": 1})).is_success
        withheld = await relay.illegal_event("ban", "bob")
        await relay.message("m4")
        if version == "12":
            await relay.illegal_event("cites_create")
            await relay.message("m5")

        # The testbed really relayed them: pushed (peekproxy answered 200), withheld, or
        # served from its DAG, marked rejected by the testbed's own auth check.
        await world.wait_delivered(*relay.legal[2:])
        outbox = (await http.get("/outbox")).json()[PEEKPROXY]
        sent = {e for t in outbox["transactions"] if t["status"] == "sent" for e in t["event_ids"]}
        live = set(relay.illegal) - {backfilled, withheld}
        assert live <= sent, (live - sent, outbox)
        assert outbox["withheld"] == [withheld]
        listed = (await http.get(f"/rooms/{relay.room}/events")).json()["events"]
        assert {e["event_id"] for e in listed if "rejected" in e} == set(relay.illegal)
        by_id = {e["event_id"]: e["pdu"] for e in listed}
        # A legal event names the illegal one before it in prev_events, as a buggy server's
        # would (besides the legal one before, so that the DAG stays whole without it).
        assert set(by_id[relay.legal[-1]]["prev_events"]) & set(relay.illegal)

    # /sync: the legal messages, in order; none of the illegal events (timeline or state).
    seen = await _sync_until(world, room_id, set(relay.legal[2:]))
    timeline_ids = [e["event_id"] for e in seen]
    assert [e for e in timeline_ids if e in relay.legal[2:]] == relay.legal[2:]
    reached = {relay.illegal[e] for e in timeline_ids if e in relay.illegal}
    assert not reached, f"illegal events reached the device's /sync: {reached}"
    full = await world.sync(full_state=True, limit=100)
    room = full["rooms"]["peek"][room_id]
    every = [*room["state"]["events"], *room["timeline"]["events"]]
    assert not {e["event_id"] for e in every} & set(relay.illegal)
    levels = [e for e in every if e["type"] == "m.room.power_levels"]
    assert levels and all(f"@bob:{TESTBED}" not in e["content"]["users"] for e in levels)
    members = {
        e["state_key"]: e["content"]["membership"] for e in every if e["type"] == "m.room.member"
    }
    assert members.get(f"@admin:{TESTBED}") == "join"

    # /messages, paging back across them (and past the peek, through /backfill).
    paged = [e["event_id"] for e in await _page_back(world, room_id, full["next_batch"])]
    assert [e for e in paged if e in relay.legal] == relay.legal[::-1]
    reached = {relay.illegal[e] for e in paged if e in relay.illegal}
    assert not reached, f"illegal events reached the device's /messages: {reached}"

    # /event: 404, as for an event peekproxy does not have.
    for event_id, kind in relay.illegal.items():
        one = await _device_get(
            world, f"/rooms/{quote(room_id, safe='')}/event/{quote(event_id, safe='')}"
        )
        assert one.status_code == 404, (kind, one.status_code, one.text)
        assert one.json()["errcode"] == "M_NOT_FOUND"
    for event_id in relay.legal:
        one = await _device_get(
            world, f"/rooms/{quote(room_id, safe='')}/event/{quote(event_id, safe='')}"
        )
        assert one.status_code == 200, one.text


@pytest.mark.parametrize("event_auth", ["served", "unrecognized"])
async def test_auth_events_lost_in_a_gap_are_fetched(world: PeekWorld, event_auth: str) -> None:
    # bob's join never reaches peekproxy and get_missing_events gives nothing (a gap): his
    # message cites a join peekproxy lacks, which it must fetch (GET /event_auth, else GET
    # /event for each auth event) before the auth rules can allow the message.
    room_id = world.create_room("10", name="Gap")
    async with admin(world.listening) as http:
        relay = Relay(http, room_id)
        assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
        await relay.message("before")
        faults = {"withhold_next": 1, "missing_events_empty_next": 5}
        if event_auth == "unrecognized":
            faults["event_auth_fail_next"] = 5
        assert (await http.put("/faults", json=faults)).is_success
        join = await http.post(f"/rooms/{relay.room}/members/join", json={"user": "bob"})
        assert join.is_success, join.text
        message = await relay.message("bob after the gap", sender="bob")
        await world.wait_delivered(message)
        left = (await http.get("/faults")).json()
    assert left["withhold_next"] == 0 and left["missing_events_empty_next"] < 5
    if event_auth == "unrecognized":
        assert left["event_auth_fail_next"] < 5  # asked, refused: /event instead

    seen = await _sync_until(world, room_id, {message})
    shown = [e for e in seen if e["event_id"] == message]
    assert shown[0]["sender"] == f"@bob:{TESTBED}"

"""The observer join against a server that answers its requests badly: every peek gets a
clear Matrix error (never a 500), a join that may have gone through is left, and the daemon
goes on (a fake federation server over real TLS and DNS; tests/peek_world.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
import trio
import trustme
from signedjson.key import generate_signing_key

from peekproxy.federation.signing_key import server_key_document
from peekproxy.testbed.rooms import TestbedRoom
from tests.conftest import Spawn
from tests.peek_world import PEEKPROXY, FakeServer, PeekWorld, build_world

OBSERVER = f"@peekproxy:{PEEKPROXY}"
SUMMARY = {"room": {"world_readable": True, "room_version": "10", "join_rule": "public"}}


def _template(room_id: str) -> dict[str, Any]:
    event = {
        "room_id": room_id,
        "type": "m.room.member",
        "sender": OBSERVER,
        "state_key": OBSERVER,
        "content": {"membership": "join"},
        "auth_events": [],
        "prev_events": [],
        "depth": 3,
        "origin_server_ts": 1,
    }
    return {"event": event, "room_version": "10"}


#: mode → what the server answers (path part → (status, body)), then the peek's status and
#: a part of its error.
CASES: dict[str, tuple[dict[str, tuple[int, Any]], int, str]] = {
    "summary not an object": ({"hierarchy": (200, [])}, 502, "hierarchy gave an invalid answer"),
    "room not world_readable": (
        {"hierarchy": (200, {"room": {"world_readable": False}})},
        403,
        "not world_readable",
    ),
    "room unknown": (
        {"hierarchy": (404, {"errcode": "M_UNKNOWN", "error": "Unknown room"})},
        404,
        "hierarchy room not found",
    ),
    "template of another event": (
        {"hierarchy": (200, SUMMARY), "make_join": (200, {"event": {"type": "m.room.message"}})},
        502,
        "make_join gave an invalid answer",
    ),
    "unsupported room version": (
        {"hierarchy": (200, SUMMARY), "make_join": (200, {"event": {}, "room_version": "99"})},
        502,
        "'99' is not one we support",
    ),
    "send_join garbage": (
        {"hierarchy": (200, SUMMARY), "make_join": (200, None), "send_join": (200, {"state": 1})},
        502,
        "send_join gave an invalid answer",
    ),
    "send_join refused": (
        {
            "hierarchy": (200, SUMMARY),
            "make_join": (200, None),
            "send_join": (500, {"errcode": "M_UNKNOWN", "error": "<html>"}),
        },
        502,
        "send_join server error (HTTP 500 M_UNKNOWN: <html>)",
    ),
}


@pytest.fixture
async def world(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> PeekWorld:
    return await build_world(
        nursery,
        tls_ca,
        tmp_path,
        spawn,
        peeks_env={
            "PEEKPROXY_PEEKS__FALLBACK": "observer_join",
            "PEEKPROXY_PEEKS__RENEWAL_INTERVAL_MAX": "1s",  # observer joins check each second
        },
    )


async def test_bad_answers_to_the_observer_join_fail_the_peek_cleanly(
    world: PeekWorld, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    server: FakeServer = await world.add_server(nursery, tls_ca, tmp_path, "forger.test")
    answers: dict[str, tuple[int, Any]] = {}
    asked: list[str] = []

    async def handler(scope: Any, body: bytes) -> tuple[int, Any]:
        path = unquote(scope["path"])
        step = path.split("/")[4] if path.startswith("/_matrix/federation/") else path
        asked.append(step)
        if step in answers:
            status, answer = answers[step]
            if step == "make_join" and answer is None:
                answer = _template(path.split("/")[5])
            return status, answer
        return 404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}

    server.handler = handler
    for i, (name, (answers_now, status, error)) in enumerate(CASES.items()):
        answers.clear()
        answers.update(answers_now)
        asked.clear()
        room_id = f"!case{i}:forger.test"
        response = await world.peek(room_id, hints=["forger.test"], device=f"D{i}")
        assert response.status_code == status, (name, response.text)
        body = response.json()
        assert body["errcode"] and error in body["error"], (name, body)
        if name == "room not world_readable":
            assert "send_join" not in asked  # decided before joining
        # An unusable send_join answer: we may be in the room, so we leave (make_leave is
        # answered 404 M_UNRECOGNIZED here: counted as left).
        assert ("make_leave" in asked) == (name == "send_join garbage"), (name, asked)
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{world.daemon.client}/health")).status_code == 200
    assert world.daemon.process.returncode is None


class JoinedRoomServer:
    """forger.test hosting a real room (signed with its published key) that says it is
    world_readable in its summary but is not: the observer's join must be undone."""

    def __init__(self, server: FakeServer, history_visibility: str = "shared") -> None:
        self.key = generate_signing_key("f1")
        self.room = TestbedRoom.create(
            server_name="forger.test", signing_key=self.key, room_version="10",
            creator="@admin:forger.test", now_ms=int(time.time() * 1000),
            history_visibility=history_visibility,
        )  # fmt: skip
        self.asked: list[str] = []
        self.make_leave_status = 200
        self.event_status = 200
        server.handler = self.handle

    def _template(self, membership: str) -> dict[str, Any]:
        latest, pdu = self.room.latest()
        ids = dict(
            zip(
                ((p["type"], p["state_key"]) for p in self.room.state_at(latest)),
                self.room.state_ids_at(latest),
                strict=True,
            )
        )
        auth = [ids[("m.room.create", "")], ids[("m.room.power_levels", "")]]
        event = _template(self.room.room_id)["event"] | {
            "auth_events": [*auth, ids[("m.room.join_rules", "")]],
            "prev_events": [latest],
            "depth": pdu["depth"] + 1,
            "content": {"membership": membership},
        }
        return {"event": event, "room_version": "10"}

    async def handle(self, scope: Any, body: bytes) -> tuple[int, Any]:
        path = unquote(scope["path"])
        if path == "/_matrix/key/v2/server":
            now = int(time.time() * 1000)
            return 200, server_key_document(
                "forger.test", self.key, now_ms=now, valid_for_ms=3_600_000
            )
        step = path.split("/")[4]
        self.asked.append(step)
        latest, _ = self.room.latest()
        answers: dict[str, tuple[int, Any]] = {
            "hierarchy": (200, SUMMARY),  # it lies
            "make_join": (200, self._template("join")),
            "send_join": (200, {"state": self.room.state_at(latest), "auth_chain": []}),
            "make_leave": (self.make_leave_status, self._template("leave")),
            "send_leave": (200, {}),
            "event": (self.event_status, {"errcode": "M_FORBIDDEN", "error": "Host not in room."}),
            "backfill": (200, {"origin": "forger.test", "origin_server_ts": 1, "pdus": []}),
        }
        return answers.get(step, (404, {"errcode": "M_UNRECOGNIZED", "error": "no"}))


async def test_a_join_into_a_room_that_may_not_be_peeked_is_undone_and_not_repeated(
    world: PeekWorld, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    forger = JoinedRoomServer(await world.add_server(nursery, tls_ca, tmp_path, "forger.test"))
    room_id = forger.room.room_id
    response = await world.peek(room_id, hints=["forger.test"])
    assert response.status_code == 403, response.text
    assert "not world_readable" in response.json()["error"]
    membership = [step for step in forger.asked if "join" in step or "leave" in step]
    assert membership == ["make_join", "send_join", "make_leave", "send_leave"]  # left at once
    # Room members saw a join and a leave: a peek again does not join again soon.
    asked = len(forger.asked)
    response = await world.peek(room_id, hints=["forger.test"], device="D2")
    assert response.status_code == 403, response.text
    assert "does not join it again for" in response.json()["error"]
    assert "send_join" not in forger.asked[asked:]


async def test_a_leave_that_fails_after_an_undone_join_is_retried(
    world: PeekWorld, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    forger = JoinedRoomServer(await world.add_server(nursery, tls_ca, tmp_path, "forger.test"))
    forger.make_leave_status = 502
    response = await world.peek(forger.room.room_id, hints=["forger.test"])
    assert response.status_code == 403, response.text
    assert forger.asked.count("make_leave") == 1
    forger.make_leave_status = 200
    with trio.fail_after(20):  # the subscription retries it, backing off
        while "send_leave" not in forger.asked:  # noqa: ASYNC110 (a remote's log)
            await trio.sleep(0.1)


async def test_an_observer_found_out_of_the_room_at_a_renewal_ends_the_peek(
    world: PeekWorld, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    forger = JoinedRoomServer(
        await world.add_server(nursery, tls_ca, tmp_path, "forger.test"), "world_readable"
    )
    room_id = forger.room.room_id
    response = await world.peek(room_id, hints=["forger.test"])
    assert response.status_code == 200, response.text
    since = (await world.sync())["next_batch"]
    with trio.fail_after(10):
        while "event" not in forger.asked:  # noqa: ASYNC110 (a remote's log)
            await trio.sleep(0.1)
    assert world.subscription(room_id)["state"] == "active"  # still in: nothing changes
    # Kicked while we did not hear of it: the next renewal finds out, and the peek ends
    # instead of joining again (that would undo the kick).
    forger.event_status = 403
    with trio.fail_after(10):
        while world.subscription(room_id)["state"] != "ended":  # noqa: ASYNC110 (its database)
            await trio.sleep(0.1)
    assert forger.asked.count("send_join") == 1
    synced = await world.sync(since=since)
    assert room_id in synced["rooms"]["leave"]

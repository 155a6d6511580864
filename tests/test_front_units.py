"""Unit tests of the sync front's pieces: the pure rules (core/front_sync.py), the token
check's cache (api/upstream_auth.py) and the join-while-peeking path of the merged /sync
(services/front_sync.py over a real store, the homeserver played by an in-process fake)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client import REGISTRY

from peekproxy.api.errors import MatrixError
from peekproxy.api.upstream_auth import UpstreamAuth
from peekproxy.core.front_sync import (
    encode_answer,
    filter_timeline_limit,
    has_news,
    is_inline_filter,
    is_token_shape,
    joined_rooms,
    json_object,
    merge_sync,
    sync_answer,
    token_hash,
    without_wait,
)
from peekproxy.core.subscription import Subscription, SubState
from peekproxy.homeserver.client import HomeserverClient
from peekproxy.services.assembly import Services
from peekproxy.services.front_sync import FrontSync, FrontSyncRequest
from peekproxy.services.passthrough import ClientRequest, Passthrough
from peekproxy.store import Storage
from peekproxy.store.sqlite import open_sqlite
from tests.offline import offline_service

# -- core/front_sync.py ---------------------------------------------------------------------


def test_filter_timeline_limit() -> None:
    assert filter_timeline_limit({"room": {"timeline": {"limit": 3}}}) == 3
    assert filter_timeline_limit({"room": {"timeline": {"limit": 1000}}}) == 100
    odd: Any
    for odd in (None, [], {"room": []}, {"room": {"timeline": {"limit": "5"}}}, {}):
        assert filter_timeline_limit(odd) == 10
    assert filter_timeline_limit({"room": {"timeline": {"limit": True}}}) == 10
    assert filter_timeline_limit({"room": {"timeline": {"limit": 0}}}) == 10
    assert is_inline_filter(' {"room": {}}') and not is_inline_filter("12")


def test_merge_keeps_the_homeserver_answer_and_adds_the_peek_rooms() -> None:
    homeserver = {
        "next_batch": "s9",
        "rooms": {"join": {"!j:hs": {"x": 1}}, "leave": {"!both:hs": {"hs": True}}},
        "to_device": {"events": [{"type": "t"}]},
    }
    peek = {
        "next_batch": "pp1_5",
        "rooms": {
            "peek": {"!p:r": {"timeline": {}}, "!j:hs": {"timeline": {}}},
            "leave": {"!l:r": {}, "!both:hs": {"peek": True}},
        },
    }
    before = json.dumps(homeserver), json.dumps(peek)
    merged = merge_sync(homeserver, peek, section="peek", drop={"!j:hs"})
    assert (json.dumps(homeserver), json.dumps(peek)) == before  # inputs untouched
    assert merged["next_batch"] == "s9" and merged["to_device"] == homeserver["to_device"]
    assert merged["rooms"]["join"] == {"!j:hs": {"x": 1}}
    assert merged["rooms"]["peek"] == {"!p:r": {"timeline": {}}}
    assert merged["rooms"]["leave"] == {"!both:hs": {"hs": True}, "!l:r": {}}
    peeking: dict[str, Any] = {"rooms": {"peeking": {"!p:r": {}}, "leave": {}}}
    assert merge_sync({"next_batch": "s"}, peeking, section="peeking")["rooms"] == {
        "peeking": {"!p:r": {}}
    }
    assert joined_rooms(homeserver) == {"!j:hs"} and joined_rooms({"rooms": []}) == set()
    assert has_news(peek, "peek") and not has_news(
        peek, "peek", {"!p:r", "!j:hs", "!l:r", "!both:hs"}
    )
    assert not has_news({"next_batch": "pp1_1", "rooms": {"peek": {}, "leave": {}}}, "peek")


def test_without_wait_and_token_hash() -> None:
    assert (
        without_wait("since=s1&timeout=30000&filter=%7B%7D") == "since=s1&filter=%7B%7D&timeout=0"
    )
    assert without_wait("") == "timeout=0"
    assert token_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_merged_answers_are_utf8_json_even_with_a_lone_surrogate() -> None:
    assert encode_answer({"body": "é"}) == '{"body":"é"}'.encode()
    # The homeserver may send an escaped lone surrogate: it cannot be UTF-8, so it stays
    # escaped rather than failing the sync.
    odd = json.loads('{"body":"\\ud800é"}')
    assert json.loads(encode_answer(odd)) == odd


def test_json_objects_from_others_never_raise() -> None:
    assert json_object(b'{"a": [1]}') == {"a": [1]}
    assert json_object('{"a": 1}') == {"a": 1}
    deep = b"[" * 100_000 + b"]" * 100_000  # past the parser's recursion limit
    for odd in (b"[1]", b'"x"', b"null", b"{", b"\xff\xfe", b"", deep, b"1" * 5000):
        assert json_object(odd) is None, odd[:20]
    # A filter nested too deeply: the default limit (the homeserver judges the filter).
    assert filter_timeline_limit(json_object('{"room":' + "[" * 5000 + "]" * 5000 + "}")) == 10


def test_sync_answers_need_an_object_with_a_string_next_batch() -> None:
    assert sync_answer(b'{"next_batch": "s1", "rooms": {}}') == (
        {"next_batch": "s1", "rooms": {}},
        "s1",
    )
    for odd in (
        b"[1, 2]",
        b'{"next_batch": 5}',
        b'{"rooms": {}}',
        b"<html>",
        b'{"next_batch": "s1", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ):
        assert sync_answer(odd) is None, odd[:30]


def test_token_shape() -> None:
    assert is_token_shape("syt_YWxpY2U_abcDEF_0a1b2c") and is_token_shape("a.b-c~d+e/f=")
    for odd in ("", "caf\xe9", "a b", "a\x01b", "a\nb", "\u20ac", "\x7f"):
        assert not is_token_shape(odd), repr(odd)


# -- api/upstream_auth.py -------------------------------------------------------------------


def _homeserver(handler: Any) -> HomeserverClient:
    return HomeserverClient(
        "http://hs.test", http=httpx.AsyncClient(transport=httpx.MockTransport(handler))
    )


def _checks(result: str) -> float:
    value = REGISTRY.get_sample_value("peekproxy_token_checks_total", {"result": result})
    return value or 0.0


async def test_whoami_answers_are_cached_by_token_hash_and_refusals_briefly() -> None:
    asked: list[str] = []
    now = [0.0]

    def whoami(request: httpx.Request) -> httpx.Response:
        token = request.headers["authorization"].removeprefix("Bearer ")
        asked.append(token)
        if token == "good":
            return httpx.Response(200, json={"user_id": "@a:hs", "device_id": "D"})
        return httpx.Response(
            401, json={"errcode": "M_UNKNOWN_TOKEN", "error": "x", "soft_logout": True}
        )

    auth = UpstreamAuth(_homeserver(whoami), clock=lambda: now[0])
    cached_before = _checks("cached")
    for _ in range(3):
        assert await auth.whoami("good") == ("@a:hs", "D")
        with pytest.raises(MatrixError) as refused:
            await auth.whoami("bad")
        assert refused.value.status == 401 and refused.value.errcode == "M_UNKNOWN_TOKEN"
        assert refused.value.to_json()["soft_logout"] is True
    assert asked == ["good", "bad"]  # one homeserver request each
    assert _checks("cached") - cached_before == 4  # peekproxy_token_checks{result="cached"}
    assert all("good" not in key and "bad" not in key for key in auth._cache)
    now[0] = 11.0  # a refusal is remembered ~10 s, an answer ~60 s
    with pytest.raises(MatrixError):
        await auth.whoami("bad")
    assert await auth.whoami("good") == ("@a:hs", "D")
    assert asked == ["good", "bad", "bad"]
    now[0] = 61.0
    await auth.whoami("good")
    assert asked[-1] == "good" and len(asked) == 4


async def test_whoami_unreachable_or_nonsense_is_a_502() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    def nonsense(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, text="<html>")

    def deep(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"[" * 100_000 + b"]" * 100_000)

    for handler in (down, nonsense, deep):
        with pytest.raises(MatrixError) as failed:
            await UpstreamAuth(_homeserver(handler)).whoami("t")
        assert failed.value.status == 502 and failed.value.errcode == "M_UNKNOWN"


async def test_tokens_no_homeserver_issues_are_refused_without_asking() -> None:
    asked: list[httpx.Request] = []

    def whoami(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        return httpx.Response(200, json={"user_id": "@a:hs", "device_id": "D"})

    auth = UpstreamAuth(_homeserver(whoami))
    for odd in ("caf\xe9", "\u20ac", "a b", "a\x00b"):
        with pytest.raises(MatrixError) as refused:
            await auth.whoami(odd)
        assert refused.value.status == 401 and refused.value.errcode == "M_UNKNOWN_TOKEN"
    assert asked == []


# -- services/front_sync.py: join while peeking ---------------------------------------------

ROOM = "!peeked:remote.test"
ALICE, BOB = "@alice:hs.test", "@bob:hs.test"


def _request(user: str, device: str, since: str | None) -> FrontSyncRequest:
    query = "timeout=0" + (f"&since={since}" if since else "")
    return FrontSyncRequest(
        client=ClientRequest("GET", "/_matrix/client/v3/sync", query, "tok", True),
        user_id=user,
        device_id=device,
        since=since,
        timeout_ms=0,
        full_state=False,
        filter=None,
    )


def _subscription() -> Subscription:
    return Subscription(
        room_id=ROOM,
        state=SubState.ACTIVE,
        candidates=("remote.test",),
        room_version="10",
        server="remote.test",
        peek_id="p1",
    )


async def _services(store: Storage) -> Services:
    """The services over ``store`` (as after a start: memory empty), following ROOM."""
    sub = _subscription()
    await store.write(lambda tx: tx.save_subscription(sub))
    service = offline_service(store)
    await service.syncing.open_live_window()
    service.subscriptions.by_room = {ROOM: sub}
    return service


def _front(store: Storage, service: Services, rooms: dict[str, Any]) -> FrontSync:
    """The merged /sync before a fake homeserver answering ``rooms`` with a new
    ``next_batch`` each time."""
    batches = itertools.count(1)

    def homeserver(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"next_batch": f"s{next(batches)}", "rooms": rooms})

    return FrontSync(
        passthrough=Passthrough(_homeserver(homeserver)),
        syncing=service.syncing,
        store=store,
        section="peek",
    )


async def _message(store: Storage, event_id: str, body: str) -> None:
    pdu = {
        "type": "m.room.message",
        "sender": "@c:remote.test",
        "room_id": ROOM,
        "content": {"body": body},
        "origin_server_ts": 1,
    }
    await store.write(lambda tx: tx.append_event(ROOM, event_id, pdu, redacted=False, now_ms=0))


async def _peek(store: Storage, user: str, device: str, state: str = "active") -> None:
    await store.write(lambda tx: tx.set_device_peek(user, device, ROOM, state, 0))


async def _sync(front: FrontSync, user: str, device: str, since: str | None) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((await front.sync(_request(user, device, since))).body)
    return body


def _count(store: Storage, monkeypatch: pytest.MonkeyPatch, operation: str = "write") -> list[int]:
    """A list that gets an entry for every store ``operation`` (``write``, ``read``) from
    now on."""
    calls: list[int] = []
    call = getattr(store, operation)

    async def counted(fn: Any) -> Any:
        calls.append(1)
        return await call(fn)

    monkeypatch.setattr(store, operation, counted)
    return calls


async def test_a_joined_room_leaves_the_peek_section_without_a_leave(tmp_path: Path) -> None:
    store = await open_sqlite(tmp_path / "p.db", "local.test")
    service = await _services(store)
    for user, device in ((ALICE, "PHONE"), (ALICE, "TABLET"), (BOB, "PHONE")):
        await _peek(store, user, device)
    await _message(store, "$e1", "hello")
    homeserver_rooms: dict[str, Any] = {"join": {ROOM: {"timeline": {"events": []}}}}
    front = _front(store, service, homeserver_rooms)
    # Alice's phone: the homeserver says she joined the room it was peeking.
    first = await front.sync(_request(ALICE, "PHONE", None))
    body = json.loads(first.body)
    assert body["rooms"]["join"] == {ROOM: {"timeline": {"events": []}}}
    assert ROOM not in body["rooms"].get("peek", {}) and ROOM not in body["rooms"].get("leave", {})
    states = await store.read(lambda tx: tx.user_room_peeks(ALICE, ROOM))
    assert states == [("PHONE", "joined"), ("TABLET", "joined")]  # all her devices
    assert await store.read(lambda tx: tx.device_peek_state(BOB, "PHONE", ROOM)) == "active"
    assert service.subscriptions.by_room[ROOM].wanted  # Bob still peeks it
    # Her tablet never gets the room in rooms.leave (nor in rooms.peek).
    tablet = await service.syncing.sync(ALICE, "TABLET", since=None, timeout_ms=0)
    assert tablet["rooms"] == {"peek": {}, "leave": {}}
    # She leaves the room on the homeserver: it never comes back to rooms.peek.
    homeserver_rooms.clear()
    homeserver_rooms["leave"] = {ROOM: {"hs": "left"}}
    later = json.loads((await front.sync(_request(ALICE, "PHONE", body["next_batch"]))).body)
    assert later["rooms"] == {"leave": {ROOM: {"hs": "left"}}}
    # Bob joins too: nobody peeks the room any more, so its remote peek is released.
    homeserver_rooms.clear()
    homeserver_rooms["join"] = {ROOM: {}}
    await front.sync(_request(BOB, "PHONE", None))
    assert not service.subscriptions.by_room[ROOM].wanted
    # Unpeeking a joined peek: not peeking (400), no rooms.leave entry.
    with pytest.raises(Exception) as bad_state:
        await service.syncing.unpeek(ALICE, "PHONE", ROOM)
    assert getattr(bad_state.value, "errcode", None) == "M_BAD_STATE"
    with trio.fail_after(5):
        await store.aclose()


# -- services/front_sync.py: devices without peeks ------------------------------------------


def _metric(outcome: str) -> float:
    value = REGISTRY.get_sample_value("peekproxy_front_syncs_total", {"outcome": outcome})
    return value or 0.0


async def test_devices_that_never_peeked_sync_without_store_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Their tokens are not saved (nothing can be due to them); once one peeks, its first
    peek section shows the room afresh, before and after a restart of peekproxy."""
    store = await open_sqlite(tmp_path / "p.db", "local.test")
    service = await _services(store)
    front = _front(store, service, {})
    writes, reads = _count(store, monkeypatch), _count(store, monkeypatch, "read")
    since: dict[str, str | None] = {"PHONE": None, "TABLET": None}
    alone, merged = _metric("homeserver"), _metric("merged")
    for _ in range(5):
        for device, token in since.items():
            answer = await _sync(front, ALICE, device, token)
            assert "peek" not in answer["rooms"]
            since[device] = answer["next_batch"]
    assert writes == []
    assert (_metric("homeserver") - alone, _metric("merged") - merged) == (10, 0)
    assert len(reads) == 2  # each device's initial sync; none later
    # The phone peeks the room (which had an event before): shown afresh, the event in it.
    await _message(store, "$before", "before the peek")
    await _peek(store, ALICE, "PHONE")
    answer = await _sync(front, ALICE, "PHONE", since["PHONE"])
    timeline = answer["rooms"]["peek"][ROOM]["timeline"]["events"]
    assert [e["event_id"] for e in timeline] == ["$before"]
    assert _metric("merged") - merged == 1  # peekproxy_front_syncs{outcome="merged"}
    since["PHONE"] = answer["next_batch"]
    assert await store.read(lambda tx: tx.newest_front_position(ALICE, "PHONE")) is not None
    # peekproxy restarts (memory empty); then the tablet peeks: shown afresh too.
    service = await _services(store)
    front = _front(store, service, {})
    await _peek(store, ALICE, "TABLET")
    answer = await _sync(front, ALICE, "TABLET", since["TABLET"])
    timeline = answer["rooms"]["peek"][ROOM]["timeline"]["events"]
    assert [e["event_id"] for e in timeline] == ["$before"]
    # The phone goes on from its saved position: nothing again.
    assert "peek" not in (await _sync(front, ALICE, "PHONE", since["PHONE"]))["rooms"]
    assert await store.read(lambda tx: tx.newest_front_position(ALICE, "NEVER")) is None
    with trio.fail_after(5):
        await store.aclose()


async def test_a_device_whose_peeks_ended_stops_writing_once_its_leave_went_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_sqlite(tmp_path / "p.db", "local.test")
    service = await _services(store)
    front = _front(store, service, {})
    await _peek(store, ALICE, "PHONE")
    peeking = await _sync(front, ALICE, "PHONE", None)
    assert ROOM in peeking["rooms"]["peek"]
    await _peek(store, ALICE, "PHONE", "ended")
    left = await _sync(front, ALICE, "PHONE", peeking["next_batch"])
    assert ROOM in left["rooms"]["leave"]
    newest = await store.read(lambda tx: tx.newest_front_position(ALICE, "PHONE"))
    writes = _count(store, monkeypatch)
    since = left["next_batch"]
    for _ in range(5):
        answer = await _sync(front, ALICE, "PHONE", since)
        assert answer["rooms"] == {}  # the leave once only
        since = answer["next_batch"]
    assert writes == []
    assert await store.read(lambda tx: tx.newest_front_position(ALICE, "PHONE")) == newest
    # A retry of the request whose answer had the leave gets it again.
    retried = await _sync(front, ALICE, "PHONE", peeking["next_batch"])
    assert ROOM in retried["rooms"]["leave"]
    # After a restart, the token it holds (never saved) continues from the newest position.
    service = await _services(store)
    front = _front(store, service, {})
    assert (await _sync(front, ALICE, "PHONE", since))["rooms"] == {}
    with trio.fail_after(5):
        await store.aclose()

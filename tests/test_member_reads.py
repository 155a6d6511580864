"""What other servers ask of a member (issue 13), over real sockets: peekproxy's federation
app in-process (real store, real keyring, the peek services), asked by a server of the test
process that signs its requests and publishes its key over TLS (tests/peer.py).

A room is *observed* when its subscription is held by an observer join (a ``join:`` handle):
the follower here hands out such a following with the room's state at the observer's join,
as the observer join follower does; later events are stored as ``/send`` stores them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio
import trustme
from signedjson.key import generate_signing_key, get_verify_key

from peekproxy.api.federation import federation_app
from peekproxy.core.xmatrix import authorization_header
from peekproxy.federation.keyring import StoredKey
from peekproxy.services.assembly import Services
from peekproxy.services.observer_queries import ObserverQueries
from peekproxy.services.settings import ObserverSettings
from peekproxy.testbed.rooms import TestbedRoom
from tests.conftest import OpenStore
from tests.member_support import DEVICE, Followings, RoomView, Snapshot, now_ms, serve_member
from tests.peer import Peer, loopback_client
from tests.support import serve_app

OUR = "observer.test"
OBSERVER = ObserverSettings(
    user_id=f"@peekproxy:{OUR}", joins=True, displayname="peekproxy observer", linger_ms=0
)
REMOTE = "remote.test"
REMOTE_KEY = generate_signing_key("r1")
OUR_KEY = generate_signing_key("o1")
ALICE = f"@alice:{REMOTE}"
V1 = "/_matrix/federation/v1"


def _view(room: TestbedRoom) -> RoomView:
    """The room at its latest event, with every earlier event as history."""
    latest, _ = room.latest()
    events = dict(zip(room.event_ids, room.events, strict=True))
    state = {
        (pdu["type"], pdu["state_key"]): event_id
        for event_id, pdu in zip(room.state_ids_at(latest), room.state_at(latest), strict=True)
    }
    history = [(e, p, False) for e, p in zip(room.event_ids[:-1], room.events[:-1], strict=True)]
    return RoomView(Snapshot(room.rules.identifier, events, frozenset(), state, latest), history)


@dataclass
class World:
    services: Services
    follower: Followings
    url: str
    peer: Peer  # bob's server: in the observed room
    stranger: Peer  # no member in any room
    room: TestbedRoom  # observed
    peeked: TestbedRoom  # followed by an MSC2444 peek, bob in it too
    ids: dict[str, str]

    async def append(self, room: TestbedRoom, event_id: str, *, redacted: bool = False) -> None:
        pdu = _pdu(room, event_id)
        assert pdu is not None
        await self.services.store.write(
            lambda tx: tx.append_event(
                room.room_id, event_id, pdu, redacted=redacted, now_ms=now_ms()
            )
        )

    async def ask(
        self,
        method: str,
        path: str,
        content: Any = None,
        *,
        peer: Peer | None = None,
        url: str | None = None,
    ) -> httpx.Response:
        """A request signed by ``peer`` (default: bob's server)."""
        peer = peer or self.peer
        header = authorization_header(
            peer.signing_key,
            origin=peer.name,
            destination=OUR,
            method=method,
            uri=path,
            content=content,
        )
        async with httpx.AsyncClient(base_url=url or self.url, timeout=20) as http:
            return await http.request(method, path, headers={"Authorization": header}, json=content)


def _message(room: TestbedRoom, body: str, peer: Peer | None = None) -> str:
    """A message by alice, or by bob of ``peer``."""
    sender, key, origin = (
        (ALICE, REMOTE_KEY, None)
        if peer is None
        else (f"@bob:{peer.name}", peer.signing_key, peer.name)
    )
    return room.send(
        key, sender=sender, type="m.room.message", content={"body": body}, now_ms=now_ms(),
        origin=origin,
    )[0]  # fmt: skip


@pytest.fixture
async def world(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, open_store: OpenStore
) -> AsyncIterator[World]:
    """The member's federation app over a store on either engine (``open_store``)."""
    for name in ("bob", "stranger"):
        (tmp_path / name).mkdir()
    peer, stranger = Peer(tls_ca, tmp_path / "bob"), Peer(tls_ca, tmp_path / "stranger")
    for server in (peer, stranger):
        await server.start(nursery)
    bob = f"@bob:{peer.name}"

    room = TestbedRoom.create(
        server_name=REMOTE, signing_key=REMOTE_KEY, room_version="10", creator=ALICE,
        now_ms=now_ms(),
    )  # fmt: skip
    ids = {"bob": room.join(peer.signing_key, bob, now_ms(), origin=peer.name)[0]}
    ids["m0"] = _message(room, "m0")
    ids["topic"] = room.send(
        REMOTE_KEY, sender=ALICE, type="m.room.topic", state_key="", content={"topic": "t"},
        now_ms=now_ms(),
    )[0]  # fmt: skip
    ids["join"] = room.join(OUR_KEY, OBSERVER.user_id, now_ms(), origin=OUR)[0]
    peeked = TestbedRoom.create(
        server_name=REMOTE, signing_key=REMOTE_KEY, room_version="10", creator=ALICE,
        now_ms=now_ms(),
    )  # fmt: skip
    peeked.join(peer.signing_key, bob, now_ms(), origin=peer.name)
    ids["peeked"] = _message(peeked, "secret of a peeked room")

    store = await open_store(OUR)
    views = {room.room_id: _view(room), peeked.room_id: _view(peeked)}
    follower = Followings(REMOTE, views, {room.room_id})
    services, url = await serve_member(
        nursery,
        store=store,
        client=loopback_client(peer.ca_file),
        follower=follower,
        server_name=OUR,
        signing_key=OUR_KEY,
        observer=OBSERVER,
    )
    world = World(services, follower, url, peer, stranger, room, peeked, ids)
    # After the join, as /send stores them: m1, m2 (stored redacted), m3.
    for name in ("m1", "m2", "m3"):
        ids[name] = _message(room, name, peer if name == "m1" else None)
        await world.append(room, ids[name], redacted=name == "m2")
    yield world
    await store.aclose()


def _pdu(room: TestbedRoom, event_id: str) -> dict[str, Any]:
    pdu = room.event(event_id)
    assert pdu is not None
    return pdu


def _path(template: str, *values: str) -> str:
    return V1 + template.format(*(quote(v, safe="") for v in values))


async def test_event_is_served_as_stored_and_redacted_when_stored_so(world: World) -> None:
    ids, room = world.ids, world.room
    answer = await world.ask("GET", _path("/event/{}", ids["m1"]))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["origin"] == OUR and isinstance(body["origin_server_ts"], int)
    assert body["pdus"] == [_pdu(room, ids["m1"])]
    assert "event_id" not in body["pdus"][0]
    redacted = (await world.ask("GET", _path("/event/{}", ids["m2"]))).json()["pdus"][0]
    assert redacted["content"] == {} and redacted["hashes"] == _pdu(room, ids["m2"])["hashes"]
    missing = await world.ask("GET", _path("/event/{}", "$nope"))
    assert missing.status_code == 404 and missing.json()["errcode"] == "M_NOT_FOUND"
    bad = await world.ask("GET", _path("/event/{}", "no-sigil"))
    assert bad.status_code == 400 and bad.json()["errcode"] == "M_INVALID_PARAM"
    unsigned = await httpx.AsyncClient(base_url=world.url).get(_path("/event/{}", ids["m1"]))
    assert unsigned.status_code == 401


async def test_state_before_an_event_with_its_auth_chain(world: World) -> None:
    ids, room = world.ids, world.room
    for name, before in (("m3", "m2"), ("m1", "join"), ("join", "topic")):
        answer = await world.ask("GET", _path("/state_ids/{}?event_id={}", room.room_id, ids[name]))
        assert answer.status_code == 200, (name, answer.text)
        expected = room.state_ids_at(ids[before])
        assert sorted(answer.json()["pdu_ids"]) == sorted(expected), name
        chain = room.auth_chain_ids(room.state_at(ids[before]))
        assert sorted(answer.json()["auth_chain_ids"]) == sorted(chain), name
    full = await world.ask("GET", _path("/state/{}?event_id={}", room.room_id, ids["join"]))
    assert full.status_code == 200
    pdus = full.json()["pdus"]
    assert sorted(map(str, pdus)) == sorted(map(str, room.state_at(ids["topic"])))
    assert {p["type"] for p in full.json()["auth_chain"]} >= {"m.room.create"}


async def test_state_that_cannot_be_told_is_404_and_a_missing_event_id_400(world: World) -> None:
    ids, room = world.ids, world.room
    for name in ("m0", "topic"):  # the topic and the join came after m0; a topic's prior: ?
        answer = await world.ask("GET", _path("/state_ids/{}?event_id={}", room.room_id, ids[name]))
        assert answer.status_code == 404 and answer.json()["errcode"] == "M_NOT_FOUND", name
    unknown = await world.ask("GET", _path("/state/{}?event_id={}", room.room_id, "$nope"))
    assert unknown.status_code == 404
    missing = await world.ask("GET", _path("/state_ids/{}", room.room_id))
    assert missing.status_code == 400 and missing.json() == {
        "errcode": "M_MISSING_PARAM",
        "error": "Missing string query parameter 'event_id'",
    }
    bad_room = await world.ask("GET", _path("/state_ids/{}?event_id={}", "room", ids["m3"]))
    assert bad_room.status_code == 400 and bad_room.json()["errcode"] == "M_INVALID_PARAM"


async def test_backfill_newest_first_from_stored_events(world: World) -> None:
    ids, room = world.ids, world.room
    answer = await world.ask("GET", _path("/backfill/{}?v={}&limit=3", room.room_id, ids["m3"]))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["origin"] == OUR
    assert [p["depth"] for p in body["pdus"]] == [_pdu(room, ids[n])["depth"] for n in
                                                   ("m3", "m2", "m1")]  # fmt: skip
    assert body["pdus"][0] == _pdu(room, ids["m3"]) and body["pdus"][1]["content"] == {}
    everything = await world.ask(
        "GET", _path("/backfill/{}?v={}&limit=99999", room.room_id, ids["m3"])
    )
    assert len(everything.json()["pdus"]) == len(room.events)  # clamped to 100, all stored
    for query, errcode in (
        ("limit=3", "M_MISSING_PARAM"),
        (f"v={quote(ids['m3'])}", "M_MISSING_PARAM"),
        (f"v={quote(ids['m3'])}&limit=ten", "M_INVALID_PARAM"),
        (f"v={quote(ids['m3'])}&limit=-1", "M_INVALID_PARAM"),
        ("v=nope&limit=3", "M_INVALID_PARAM"),
    ):
        bad = await world.ask("GET", _path("/backfill/{}?", room.room_id) + query)
        assert bad.status_code == 400 and bad.json()["errcode"] == errcode, query


async def test_get_missing_events_oldest_first(world: World) -> None:
    ids, room = world.ids, world.room
    path = _path("/get_missing_events/{}", room.room_id)
    body = {"earliest_events": [ids["m0"]], "latest_events": [ids["m3"]], "limit": 10}
    answer = await world.ask("POST", path, body)
    assert answer.status_code == 200, answer.text
    events = answer.json()["events"]
    assert events[:3] == [_pdu(room, ids[n]) for n in ("topic", "join", "m1")]
    assert events[3]["content"] == {} and len(events) == 4  # m2, stored redacted
    deep = await world.ask("POST", path, {**body, "min_depth": _pdu(room, ids["m1"])["depth"]})
    assert [e["depth"] for e in deep.json()["events"]] == [e["depth"] for e in events[2:]]
    bad_bodies: list[Any] = [
        [],
        {"latest_events": "x"},
        {"latest_events": [], "limit": "10"},
        {"latest_events": [], "min_depth": 1.5},
    ]
    for bad_body in bad_bodies:
        bad = await world.ask("POST", path, bad_body)
        assert bad.status_code == 400 and bad.json()["errcode"] == "M_BAD_JSON", bad_body


async def test_event_auth(world: World) -> None:
    ids, room = world.ids, world.room
    answer = await world.ask("GET", _path("/event_auth/{}/{}", room.room_id, ids["m1"]))
    assert answer.status_code == 200, answer.text
    expected = room.auth_chain([_pdu(room, ids["m1"])])
    assert sorted(map(str, answer.json()["auth_chain"])) == sorted(map(str, expected))


async def test_rooms_not_observed_and_servers_not_in_the_room_get_403(world: World) -> None:
    ids, room, peeked = world.ids, world.room, world.peeked
    forbidden = {"errcode": "M_FORBIDDEN", "error": "Host not in room."}
    # An event of a room not observed is "not found": whether it is held is not told.
    answer = await world.ask("GET", _path("/event/{}", ids["peeked"]))
    assert (answer.status_code, answer.json()["errcode"]) == (404, "M_NOT_FOUND")
    unknown = await world.ask("GET", _path("/event/{}", "$unknown"))
    assert answer.json() == unknown.json() | {"error": answer.json()["error"]}
    asks: list[tuple[str, str, Any]] = [
        ("GET", _path("/state_ids/{}?event_id={}", peeked.room_id, ids["peeked"]), None),
        ("GET", _path("/state/{}?event_id={}", peeked.room_id, ids["peeked"]), None),
        ("GET", _path("/backfill/{}?v={}&limit=5", peeked.room_id, ids["peeked"]), None),
        ("GET", _path("/event_auth/{}/{}", peeked.room_id, ids["peeked"]), None),
        ("POST", _path("/get_missing_events/{}", peeked.room_id), {"latest_events": []}),
        ("GET", _path("/backfill/{}?v={}&limit=5", "!unknown:remote.test", ids["m3"]), None),
    ]
    for method, path, content in asks:
        answer = await world.ask(method, path, content)
        assert (answer.status_code, answer.json()) == (403, forbidden), path
    # A server with no joined member in the observed room: the same.
    answer = await world.ask("GET", _path("/event/{}", ids["m1"]), peer=world.stranger)
    assert (answer.status_code, answer.json()) == (403, forbidden)
    # Bob leaves: his server is no longer in the room.
    left = world.room.leave(world.peer.signing_key, f"@bob:{world.peer.name}", now_ms(),
                            origin=world.peer.name)[0]  # fmt: skip
    await world.append(world.room, left)
    answer = await world.ask("GET", _path("/backfill/{}?v={}&limit=5", room.room_id, left))
    assert (answer.status_code, answer.json()) == (403, forbidden)


async def test_server_acl_bans_a_server_in_the_room(world: World) -> None:
    ids, room = world.ids, world.room
    acl = room.send(
        REMOTE_KEY, sender=ALICE, type="m.room.server_acl", state_key="",
        content={"allow": ["*"], "deny": ["localhost"]}, now_ms=now_ms(),
    )[0]  # fmt: skip
    assert (await world.ask("GET", _path("/event/{}", ids["m1"]))).status_code == 200
    await world.append(room, acl)
    for method, path, content in (
        ("GET", _path("/event/{}", ids["m1"]), None),
        ("GET", _path("/state_ids/{}?event_id={}", room.room_id, acl), None),
        ("POST", _path("/get_missing_events/{}", room.room_id), {"latest_events": [acl]}),
    ):
        answer = await world.ask(method, path, content)
        assert answer.status_code == 403, path
        assert answer.json() == {"errcode": "M_FORBIDDEN", "error": "Server is banned from room"}
    # Not in the room at all: the ACL is not shown (Synapse's order).
    answer = await world.ask("GET", _path("/event/{}", ids["m1"]), peer=world.stranger)
    assert answer.json()["error"] == "Host not in room."


async def test_a_room_no_longer_followed_is_not_served(world: World) -> None:
    room = world.room
    await world.services.syncing.unpeek(*DEVICE, room.room_id)
    with trio.fail_after(10):  # observer linger 0: the room's task leaves at once
        await world.follower.stopped.wait()
    answer = await world.ask(
        "GET", _path("/state_ids/{}?event_id={}", room.room_id, world.ids["m3"])
    )
    assert answer.status_code == 403 and answer.json()["error"] == "Host not in room."


async def test_the_observer_user_devices_keys_and_profile(
    world: World, nursery: trio.Nursery
) -> None:
    observer = OBSERVER.user_id
    answers = {
        "devices": await world.ask("GET", _path("/user/devices/{}", observer)),
        "query": await world.ask("POST", V1 + "/user/keys/query", {"device_keys": {observer: []}}),
        "claim": await world.ask(
            "POST", V1 + "/user/keys/claim", {"one_time_keys": {observer: {"D": "curve"}}}
        ),
        "profile": await world.ask("GET", V1 + f"/query/profile?user_id={quote(observer)}"),
        "field": await world.ask(
            "GET", V1 + f"/query/profile?user_id={quote(observer)}&field=avatar_url"
        ),
    }
    assert {name: a.status_code for name, a in answers.items()} == dict.fromkeys(answers, 200)
    assert answers["devices"].json() == {"user_id": observer, "stream_id": 0, "devices": []}
    assert answers["query"].json() == {"device_keys": {observer: {}}}
    assert answers["claim"].json() == {"one_time_keys": {}}
    assert answers["profile"].json() == {"displayname": "peekproxy observer"}
    assert answers["field"].json() == {}
    someone = f"@someone:{OUR}"
    for method, path, content, status, errcode in (
        ("GET", _path("/user/devices/{}", someone), None, 404, "M_NOT_FOUND"),
        ("GET", _path("/user/devices/{}", ALICE), None, 400, "M_UNKNOWN"),
        ("GET", _path("/user/devices/{}", "nobody"), None, 400, "M_INVALID_PARAM"),
        ("GET", V1 + f"/query/profile?user_id={quote(someone)}", None, 404, "M_NOT_FOUND"),
        ("GET", V1 + "/query/profile", None, 400, "M_MISSING_PARAM"),
        ("POST", V1 + "/user/keys/query", [], 400, "M_BAD_JSON"),
        ("POST", V1 + "/user/keys/query", {"device_keys": []}, 400, "M_BAD_JSON"),
        ("POST", V1 + "/user/keys/query", {"device_keys": {ALICE: []}}, 400, "M_UNKNOWN"),
        ("POST", V1 + "/user/keys/claim", {"one_time_keys": {"x": {}}}, 400, "M_INVALID_PARAM"),
    ):
        answer = await world.ask(method, path, content)
        assert (answer.status_code, answer.json()["errcode"]) == (status, errcode), path
    # With the fallback off, the observer is unknown too.
    off = federation_app(
        server_name=OUR,
        signing_key=OUR_KEY,
        key_valid_for_ms=3_600_000,
        old_verify_keys={},
        keyring=world.services.keyring,
        members=world.services.members,
        observer=ObserverQueries(server_name=OUR, observer=None),
    )
    url = await serve_app(nursery, off)
    answer = await world.ask("GET", _path("/user/devices/{}", observer), url=url)
    assert answer.status_code == 404 and answer.json()["errcode"] == "M_NOT_FOUND"
    answer = await world.ask("GET", V1 + f"/query/profile?user_id={quote(observer)}", url=url)
    assert answer.status_code == 404


async def _send(world: World, *pdus: dict[str, Any]) -> dict[str, Any]:
    """``PUT /send`` from bob's server holding ``pdus``; the answer's per-PDU results."""
    txn = {"origin": world.peer.name, "origin_server_ts": now_ms(), "pdus": list(pdus)}
    answer = await world.ask("PUT", V1 + f"/send/t{now_ms()}", txn)
    assert answer.status_code == 200, answer.text
    results: dict[str, Any] = answer.json()["pdus"]
    return results


async def test_events_from_a_server_the_acl_denies_are_dropped(world: World) -> None:
    room = world.room
    acl = room.send(
        REMOTE_KEY, sender=ALICE, type="m.room.server_acl", state_key="",
        content={"allow": ["*"], "deny": ["localhost"]}, now_ms=now_ms(),
    )[0]  # fmt: skip
    await world.append(room, acl)
    denied = _message(room, "from a denied server", world.peer)
    assert await _send(world, _pdu(room, denied)) == {
        denied: {"error": "Server is banned from room"}
    }
    held = await world.services.store.read(lambda tx: tx.known_event_ids([denied]))
    assert held == set()


async def test_an_acl_denying_us_ends_the_observed_room(world: World) -> None:

    from peekproxy.core.pdu_signatures import VerifyKeyInfo  # noqa: F401 (key shape)

    world.services.keyring.add_trusted(
        StoredKey(REMOTE, f"ed25519:{REMOTE_KEY.version}", get_verify_key(REMOTE_KEY),
                  valid_until_ts=2**62, expired_ts=None, fetched_ts=now_ms())
    )  # fmt: skip
    room = world.room
    acl = room.send(
        REMOTE_KEY, sender=ALICE, type="m.room.server_acl", state_key="",
        content={"allow": ["*"], "deny": [OUR]}, now_ms=now_ms(),
    )[0]  # fmt: skip
    assert await _send(world, _pdu(room, acl)) == {acl: {}}
    with trio.fail_after(10):
        await world.follower.stopped.wait()  # the observer "leaves" (Synapse refuses it)
    sub = world.services.subscriptions.get(room.room_id)
    assert sub is not None and sub.ended_reason == f"the room's server ACL denies {OUR}"

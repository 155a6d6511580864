"""The testbed as a peek target, over real TLS: a peer built on the federation core peeks,
receives /send pushes, renews, lapses and stops; errors; read endpoints; faults; admin API."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio
import trustme
from signedjson.key import encode_verify_key_base64, get_verify_key

from peekproxy.federation.client import RemoteError, path_segment
from peekproxy.federation.keyring import Keyring
from peekproxy.federation.pdu import check_pdu
from peekproxy.federation.room_versions import KNOWN_ROOM_VERSIONS, room_version
from peekproxy.testbed.server import Testbed, TestbedListening
from tests.peer import Peer, loopback_client
from tests.support import issue_cert
from tests.synapse import Synapse, free_tcp_port
from tests.testbed_support import admin, start_testbed

ALL_VERSIONS = sorted(KNOWN_ROOM_VERSIONS, key=int)


class World:
    def __init__(self, listening: TestbedListening, testbed: Testbed, peer: Peer) -> None:
        self.listening, self.testbed, self.peer = listening, testbed, peer

    @property
    def name(self) -> str:
        return self.listening.server_name

    async def peek(
        self, room_id: str, peek_id: str = "abcd1234", versions: list[str] = ALL_VERSIONS
    ) -> Any:
        path = f"/_matrix/federation/v1/peek/{path_segment(room_id)}/{path_segment(peek_id)}"
        return await self.peer.client.put_json(self.name, path, {}, query={"ver": versions})

    async def delete(self, room_id: str, peek_id: str = "abcd1234") -> Any:
        path = f"/_matrix/federation/v1/peek/{path_segment(room_id)}/{path_segment(peek_id)}"
        return (await self.peer.client.request("DELETE", self.name, path)).json()

    async def create_room(self, **spec: Any) -> str:
        async with admin(self.listening) as http:
            response = await http.post("/rooms", json=spec)
        assert response.status_code == 200, response.text
        room_id: str = response.json()["room_id"]
        return room_id

    async def send(self, room_id: str, body: str, sender: str = "admin") -> str:
        async with admin(self.listening) as http:
            response = await http.post(
                f"/rooms/{quote(room_id, safe='')}/send",
                json={"sender": sender, "content": {"msgtype": "m.text", "body": body}},
            )
        assert response.status_code == 200, response.text
        event_id: str = response.json()["event_id"]
        return event_id


@pytest.fixture
async def world(nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path) -> World:
    listening, testbed = await start_testbed(nursery, tls_ca, tmp_path)
    peer = Peer(tls_ca, tmp_path)
    await peer.start(nursery)
    return World(listening, testbed, peer)


async def _testbed_keys(world: World) -> Keyring:
    keyring = Keyring(loopback_client(world.peer.ca_file))
    await keyring.fetch_keys(world.name)
    return keyring


@pytest.mark.parametrize("version", ["10", "11", "12"])
async def test_peek_gets_a_verifiable_r3_response(world: World, version: str) -> None:
    room_id = await world.create_room(
        room_version=version, alias=f"peekable{version}", name="Peek me", topic="A topic"
    )
    await world.send(room_id, "hello before the peek")
    answer = await world.peek(room_id)
    assert set(answer) == {
        "state",
        "auth_chain",
        "latest_event",
        "renewal_interval",
        "room_version",
    }
    assert answer["room_version"] == version
    assert answer["renewal_interval"] == 3_600_000
    keyring = await _testbed_keys(world)  # the testbed's key, fetched over TLS
    rules = room_version(version)
    verdicts = [
        check_pdu(p, rules, keyring.lookup)
        for p in [*answer["state"], *answer["auth_chain"], answer["latest_event"]]
    ]
    assert [v.outcome for v in verdicts] == ["accept"] * len(verdicts), verdicts
    types = {p["type"] for p in answer["state"]}
    assert {
        "m.room.create",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.history_visibility",
        "m.room.canonical_alias",
        "m.room.name",
        "m.room.topic",
        "m.room.member",
    } <= types
    assert answer["latest_event"]["content"]["body"] == "hello before the peek"
    state_ids = {v.event_id for v in verdicts[: len(answer["state"])]}
    for pdu in answer["state"]:  # the auth chain covers the state's auth events
        chain_ids = {v.event_id for v in verdicts[len(answer["state"]) : -1]}
        assert set(pdu["auth_events"]) <= chain_ids | state_ids


async def test_events_arrive_in_order_until_delete(world: World) -> None:
    room_id = await world.create_room(room_version="11")
    await world.peek(room_id)
    sent = [await world.send(room_id, f"live {i}") for i in range(3)]
    pdus = await world.peer.wait_for_pdus(3)
    assert [p["content"]["body"] for p in pdus] == ["live 0", "live 1", "live 2"]
    assert world.peer.transactions[0]["body"]["origin"] == world.name
    assert await world.delete(room_id) == {}
    with pytest.raises(RemoteError) as caught:
        await world.delete(room_id)
    assert caught.value.status == 404
    await world.send(room_id, "after the delete")
    sender = world.testbed.senders[world.peer.name]
    await sender.wait_idle()
    assert len(world.peer.pdus) == 3 and not sender.pending
    assert len(sent) == 3


async def test_renewal_and_expiry(world: World) -> None:
    now = [world.testbed.clock_ms()]
    world.testbed.clock_ms = lambda: now[0]
    world.testbed.renewal_interval_ms = 2_000
    room_id = await world.create_room(room_version="10")
    first = await world.peek(room_id)
    assert first["renewal_interval"] == 2_000
    now[0] += 1_500
    assert await world.peek(room_id) == {}  # re-PUT renews; R3 says the reply is {}
    renew = f"/_matrix/federation/v1/peek/{path_segment(room_id)}/abcd1234/renew"
    now[0] += 1_500
    assert await world.peer.client.post_json(world.name, renew, {}) == {"renewal_interval": 2_000}
    await world.send(room_id, "still peeking")
    await world.peer.wait_for_pdus(1)
    now[0] += 2_001  # no renewal within the interval: the peek lapses
    await world.send(room_id, "nobody is told")
    sender = world.testbed.senders[world.peer.name]
    await sender.wait_idle()
    assert [p["content"]["body"] for p in world.peer.pdus] == ["still peeking"]
    with pytest.raises(RemoteError) as caught:
        await world.peer.client.post_json(world.name, renew, {})
    assert caught.value.status == 404 and caught.value.errcode == "M_NOT_FOUND"
    assert "state" in await world.peek(room_id)  # after a lapse, a PUT is a new peek


@pytest.mark.parametrize(
    ("spec", "status", "errcode"),
    [
        ({"history_visibility": "shared"}, 403, "M_FORBIDDEN"),
        ({"history_visibility": "joined"}, 403, "M_FORBIDDEN"),
        ({"encrypted": True}, 403, "M_FORBIDDEN"),
    ],
)
async def test_unpeekable_rooms(
    world: World, spec: dict[str, Any], status: int, errcode: str
) -> None:
    room_id = await world.create_room(room_version="10", **spec)
    with pytest.raises(RemoteError) as caught:
        await world.peek(room_id)
    assert (caught.value.status, caught.value.errcode) == (status, errcode)
    assert world.testbed.peeks.active(world.testbed.clock_ms()) == []


async def test_peek_errors(world: World) -> None:
    room_id = await world.create_room(room_version="12")
    with pytest.raises(RemoteError) as caught:
        await world.peek(f"!nope:{world.name}")
    assert (caught.value.status, caught.value.errcode) == (404, "M_NOT_FOUND")
    with pytest.raises(RemoteError) as caught:
        await world.peek(room_id, versions=["9", "10", "11"])
    assert (caught.value.status, caught.value.errcode) == (400, "M_INCOMPATIBLE_ROOM_VERSION")
    assert caught.value.json is not None and caught.value.json["room_version"] == "12"
    with pytest.raises(RemoteError) as caught:
        await world.peek(room_id, versions=[])  # no ver: version 1 assumed, as for make_join
    assert caught.value.errcode == "M_INCOMPATIBLE_ROOM_VERSION"
    with pytest.raises(RemoteError) as caught:
        await world.peek(room_id, peek_id="x" * 256)
    assert (caught.value.status, caught.value.errcode) == (400, "M_UNRECOGNIZED")
    async with admin(world.listening) as http:
        await http.put(
            "/faults", json={"peek_count": 1, "peek_status": 429, "peek_retry_after_ms": 1500}
        )
    with pytest.raises(RemoteError) as caught:
        await world.peek(room_id)
    assert (caught.value.status, caught.value.errcode) == (429, "M_LIMIT_EXCEEDED")
    assert caught.value.json is not None and caught.value.json["retry_after_ms"] == 1500
    assert "state" in await world.peek(room_id)  # the fault was used up
    # Unsigned requests are refused.
    context = ssl.create_default_context(cafile=str(world.peer.ca_file))
    async with httpx.AsyncClient(verify=context) as http:
        response = await http.put(
            f"{world.listening.federation}/_matrix/federation/v1/peek/"
            f"{path_segment(room_id)}/x?ver=12",
            json={},
        )
    assert response.status_code == 401 and response.json()["errcode"] == "M_UNAUTHORIZED"


async def test_read_endpoints_for_world_readable_rooms(world: World) -> None:
    room_id = await world.create_room(room_version="11")
    first = await world.send(room_id, "one")
    second = await world.send(room_id, "two")
    client, name = world.peer.client, world.name
    fed = "/_matrix/federation/v1"
    event = await client.get_json(name, f"{fed}/event/{path_segment(first)}")
    assert event["pdus"][0]["content"]["body"] == "one"
    state = await client.get_json(
        name, f"{fed}/state/{path_segment(room_id)}", query={"event_id": first}
    )
    state_ids = await client.get_json(
        name, f"{fed}/state_ids/{path_segment(room_id)}", query={"event_id": first}
    )
    assert len(state["pdus"]) == len(state_ids["pdu_ids"]) > 0
    assert len(state["auth_chain"]) == len(state_ids["auth_chain_ids"])
    backfill = await client.get_json(
        name, f"{fed}/backfill/{path_segment(room_id)}", query={"v": [second], "limit": "2"}
    )
    assert [p["content"].get("body") for p in backfill["pdus"]] == ["two", "one"]
    missing = await client.post_json(
        name,
        f"{fed}/get_missing_events/{path_segment(room_id)}",
        {"earliest_events": [], "latest_events": [second], "limit": 1, "min_depth": 0},
    )
    assert [p["content"].get("body") for p in missing["events"]] == ["one"]
    private = await world.create_room(room_version="11", history_visibility="shared")
    with pytest.raises(RemoteError) as caught:
        await client.get_json(name, f"{fed}/state/{path_segment(private)}")
    assert caught.value.status == 403


async def test_faults_on_the_outgoing_stream(world: World) -> None:
    room_id = await world.create_room(room_version="10")
    await world.peek(room_id)
    keyring = await _testbed_keys(world)
    rules = room_version("10")
    async with admin(world.listening) as http:
        await http.put("/faults", json={"duplicate_next": 1})
        await world.send(room_id, "a")  # sent, then replayed with the same txnId
        await world.peer.wait_for_pdus(2)
        txns = world.peer.transactions
        assert txns[0]["txn_id"] == txns[1]["txn_id"] and txns[0]["body"] == txns[1]["body"]

        await http.put("/faults", json={"forge_next": 1})
        await world.send(room_id, "forged")
        forged = (await world.peer.wait_for_pdus(3))[-1]
        assert check_pdu(forged, rules, keyring.lookup).outcome == "reject"

        await http.put("/faults", json={"reorder_next": 1})
        await world.send(room_id, "b")
        await world.send(room_id, "c")
        pdus = await world.peer.wait_for_pdus(5)
        assert [p["content"]["body"] for p in pdus[-2:]] == ["c", "b"]

        await http.put("/faults", json={"withhold_next": 1})
        withheld = await world.send(room_id, "withheld")
        await world.send(room_id, "d")
        last = (await world.peer.wait_for_pdus(6))[-1]
        assert last["prev_events"] == [withheld]  # a prev_event the peer never got
        fetched = await world.peer.client.post_json(
            world.name,
            f"/_matrix/federation/v1/get_missing_events/{path_segment(room_id)}",
            {"earliest_events": [], "latest_events": [], "limit": 5, "min_depth": 0}
            | {"latest_events": [check_pdu(last, rules, keyring.lookup).event_id]},
        )
        assert fetched["events"][-1]["content"]["body"] == "withheld"

        await http.put("/faults", json={"drop_next": 1})
        await world.send(room_id, "dropped")
        await world.send(room_id, "e")
        pdus = await world.peer.wait_for_pdus(7)
        assert pdus[-1]["content"]["body"] == "e"
        assert "dropped" not in [p["content"].get("body") for p in pdus]
        outbox = (await http.get("/outbox")).json()[world.peer.name]
        assert "dropped" in [t["status"] for t in outbox["transactions"]]
        assert outbox["withheld"] == [withheld]


async def test_admin_api(world: World) -> None:
    async with httpx.AsyncClient(base_url=f"{world.listening.admin}/_testbed/v1") as http:
        refused = await http.get("/rooms")
        assert refused.status_code == 401
    async with admin(world.listening) as http:
        bad = await http.post("/rooms", json={"room_version": 10})
        assert bad.status_code == 400 and bad.json()["errcode"] == "M_BAD_JSON"
        unsupported = await http.post("/rooms", json={"room_version": "9"})
        assert unsupported.status_code == 400
        created = (
            await http.post(
                "/rooms",
                json={
                    "room_version": "11",
                    "alias": "admin-room",
                    "creator": "alice",
                    "initial_state": [
                        {"type": "m.room.guest_access", "content": {"guest_access": "can_join"}}
                    ],
                },
            )
        ).json()
        room = quote(created["room_id"], safe="")
        assert created["alias"] == f"#admin-room:{world.name}"
        joined = await http.post(f"/rooms/{room}/members/join", json={"user": "bob"})
        assert joined.status_code == 200
        state = await http.post(
            f"/rooms/{room}/state",
            json={"sender": "alice", "type": "m.room.topic", "content": {"topic": "new"}},
        )
        assert state.status_code == 200
        not_joined = await http.post(
            f"/rooms/{room}/send", json={"sender": "carol", "content": {"body": "hi"}}
        )
        assert not_joined.status_code == 400
        summary = (await http.get(f"/rooms/{room}")).json()
        assert summary["joined"] == [f"@alice:{world.name}", f"@bob:{world.name}"]
        await world.peek(created["room_id"])
        peeks = (await http.get("/peeks")).json()["peeks"]
        assert [(p["origin"], p["room_id"]) for p in peeks] == [
            (world.peer.name, created["room_id"])
        ]
        expire = await http.delete(f"/peeks/{world.peer.name}/{room}/abcd1234")
        assert expire.status_code == 200
        assert (await http.get("/peeks")).json()["peeks"] == []
        assert (await http.put("/faults", json={"nonsense": 1})).status_code == 400


async def test_history_visibility_change_ends_peeks(world: World) -> None:
    room_id = await world.create_room(room_version="10")
    await world.peek(room_id)
    async with admin(world.listening) as http:
        await http.post(
            f"/rooms/{quote(room_id, safe='')}/state",
            json={"type": "m.room.history_visibility", "content": {"history_visibility": "shared"}},
        )
    pdus = await world.peer.wait_for_pdus(1)  # the change itself is delivered...
    assert pdus[0]["content"] == {"history_visibility": "shared"}
    assert world.testbed.peeks.active(world.testbed.clock_ms()) == []  # ...then peeks end


@pytest.mark.parametrize("version", ["10", "11", "12"])
async def test_testbed_events_pass_pdu_check(world: World, version: str, tmp_path: Path) -> None:
    room_id = await world.create_room(
        room_version=version, alias=f"check{version}", topic="t", name="n"
    )
    for i in range(3):
        await world.send(room_id, f"message {i} ✓ \u2028")
    async with admin(world.listening) as http:
        await http.post(f"/rooms/{quote(room_id, safe='')}/members/join", json={"user": "bob"})
        exported = (await http.get(f"/rooms/{quote(room_id, safe='')}/events")).json()
    events = tmp_path / "events.json"
    events.write_text(json.dumps([e["pdu"] for e in exported["events"]]))
    key = world.testbed.signing_key
    key_arg = f"{world.name}:ed25519:{key.version}:{encode_verify_key_base64(get_verify_key(key))}"
    result = await trio.run_process(
        [
            sys.executable,
            "-m",
            "peekproxy",
            "pdu",
            "check",
            "--room-version",
            version,
            "--key",
            key_arg,
            str(events),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 0, (lines, result.stderr)
    assert [line.split()[0] for line in lines] == [e["event_id"] for e in exported["events"]]


async def test_synapse_resolves_a_testbed_alias(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    listening, testbed = await start_testbed(nursery, tls_ca, tmp_path)
    room = testbed.create_room(
        room_version="10",
        creator="admin",
        alias="synapse-visible",
        history_visibility="world_readable",
        join_rule="public",
        encrypted=False,
        name=None,
        topic=None,
        initial_state=[],
    )
    token = synapse.register("testbed-user")
    alias = f"#synapse-visible:{listening.server_name}"
    async with httpx.AsyncClient(base_url=synapse.client, timeout=60) as http:
        response = await http.get(
            f"/_matrix/client/v3/directory/room/{quote(alias, safe='')}",
            headers={"Authorization": f"Bearer {token}"},
        )
    assert response.status_code == 200, response.text
    assert response.json()["room_id"] == room.room_id
    assert response.json()["servers"] == [listening.server_name]


async def test_command_line_testbed(tls_ca: trustme.CA, tmp_path: Path) -> None:
    port = free_tcp_port()
    cert, key = issue_cert(tls_ca, tmp_path, "localhost", "127.0.0.1")
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "peekproxy",
            "testbed",
            "--server-name",
            f"localhost:{port}",
            "--federation-bind",
            f"127.0.0.1:{port}",
            "--admin-bind",
            "127.0.0.1:0",
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--data-dir",
            str(tmp_path / "d"),
        ],
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    log = b""
    with trio.fail_after(30):
        while b"testbed ready" not in log:
            chunk = await process.stderr.receive_some(4096)
            assert chunk, log.decode()
            log += chunk
    token = (tmp_path / "d" / "admin.token").read_text().strip()
    admin_url = log.split(b"admin=")[1].split()[0].decode()
    async with httpx.AsyncClient(
        base_url=f"{admin_url}/_testbed/v1", headers={"Authorization": f"Bearer {token}"}
    ) as http:
        created = await http.post("/rooms", json={"room_version": "12", "alias": "cli"})
    assert created.status_code == 200
    assert token not in log.decode()
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(10):
        assert await process.wait() == 0
    # Rooms persist in the data directory.
    assert list((tmp_path / "d" / "rooms").glob("*.json"))


def test_example_config_loads(tmp_path: Path) -> None:
    from peekproxy.testbed.config import load_testbed_config

    example = Path(__file__).resolve().parent.parent / "testbed.example.toml"
    config = load_testbed_config(example, {})
    assert config.server.server_name == "localhost:8448"
    assert config.peeks.renewal_interval == 3600.0
    assert config.token_file == example.parent / "testbed-data" / "admin.token"

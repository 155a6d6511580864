"""The testbed as a peek target, over real TLS: a peer built on the federation core peeks,
receives /send pushes, renews, lapses and stops; errors; read endpoints; faults; admin API."""

from __future__ import annotations

import json
import os
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

from peekproxy.core.pdu import check_pdu
from peekproxy.core.room_versions import KNOWN_ROOM_VERSIONS, room_version
from peekproxy.federation.client import RemoteError, path_segment
from peekproxy.federation.keyring import Keyring
from peekproxy.testbed.server import Testbed, TestbedListening
from tests.peer import Peer, loopback_client
from tests.support import issue_cert
from tests.synapse import Synapse, free_tcp_port
from tests.testbed_support import admin, argv_for_testbed, start_testbed

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
    world.testbed.faults.update({"renew_full": 1})  # Dendrite answers every renewal in full
    renewed = await world.peek(room_id)
    assert renewed["latest_event"] == first["latest_event"] and renewed["state"]
    world.testbed.faults.update({"renew_full": 0})
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
    # Every peek request is logged with the status it got, injected faults included.
    async with admin(world.listening) as http:
        logged = (await http.get("/peek_requests")).json()["requests"]
    assert [(r["method"], r["status"]) for r in logged] == [
        ("PUT", 404),
        ("PUT", 400),
        ("PUT", 400),
        ("PUT", 400),
        ("PUT", 429),
        ("PUT", 200),
    ]
    assert {r["origin"] for r in logged} == {world.peer.name}
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


async def test_command_line_testbed(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    port = free_tcp_port()
    cert, key = issue_cert(tls_ca, tmp_path, "localhost", "127.0.0.1")
    peer = Peer(tls_ca, tmp_path)  # on loopback: reachable only with the whitelist flag
    await peer.start(nursery)
    process = await trio.lowlevel.open_process(
        argv_for_testbed(
            f"localhost:{port}",
            tmp_path / "d",
            federation_bind=f"127.0.0.1:{port}",
            tls=(cert, key),
            extra=("--ip-range-whitelist", "127.0.0.0/8", "--tls-ca-file", str(peer.ca_file)),
        ),
        stderr=subprocess.PIPE,
        env=os.environ | {"PEEKPROXY_TESTBED_PEEKS__RENEWAL_INTERVAL": "90s"},
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
        room_id = created.json()["room_id"]
        # the testbed fetches the peer's key and pushes to it, both on loopback over TLS
        path = f"/_matrix/federation/v1/peek/{path_segment(room_id)}/cli-peek"
        answer = await peer.client.put_json(f"localhost:{port}", path, {}, query={"ver": ["12"]})
        assert answer["renewal_interval"] == 90_000  # from the environment
        sent = await http.post(
            f"/rooms/{quote(room_id, safe='')}/send", json={"content": {"body": "pushed"}}
        )
        assert sent.status_code == 200
        assert (await peer.wait_for_pdus(1))[0]["content"]["body"] == "pushed"
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


# --- review fixes ------------------------------------------------------------------------------


def _room_path(room_id: str) -> str:
    return quote(room_id, safe="")


def test_flags_and_environment_overrides(tls_ca: trustme.CA, tmp_path: Path) -> None:
    from peekproxy.cli import build_parser
    from peekproxy.config import ConfigError
    from peekproxy.testbed.cli import testbed_config_from_args

    ca_file = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    args = build_parser().parse_args(
        [
            "testbed",
            "--server-name",
            "localhost:18448",
            "--data-dir",
            str(tmp_path / "d"),
            "--ip-range-whitelist",
            "127.0.0.0/8",
            "--ip-range-whitelist",
            "::1/128",
            "--tls-ca-file",
            str(ca_file),
            "--dns-nameserver",
            "127.0.0.1:5353",
        ]
    )
    environ = {
        "PEEKPROXY_TESTBED_PEEKS__RENEW_REPLY": "full",
        "PEEKPROXY_TESTBED_FEDERATION__DEFAULT_PORT": "8449",
        "PEEKPROXY_FEDERATION__DEFAULT_PORT": "1",  # peekproxy's own: not for the testbed
    }
    config = testbed_config_from_args(args, environ)
    assert config is not None
    assert [str(n) for n in config.federation.ip_range_whitelist] == ["127.0.0.0/8", "::1/128"]
    assert config.federation.tls_ca_file == ca_file
    assert [str(b) for b in config.federation.dns_nameservers] == ["127.0.0.1:5353"]
    assert config.peeks.renew_reply == "full" and config.federation.default_port == 8449
    # the environment wins over the flags, and a bad value names the variable
    override = {"PEEKPROXY_TESTBED_FEDERATION__IP_RANGE_WHITELIST": '["10.0.0.0/8"]'}
    config = testbed_config_from_args(args, override)
    assert config is not None
    assert [str(n) for n in config.federation.ip_range_whitelist] == ["10.0.0.0/8"]
    with pytest.raises(ConfigError) as caught:
        testbed_config_from_args(args, {"PEEKPROXY_TESTBED_PEEKS__RENEW_REPLY": "maybe"})
    assert "PEEKPROXY_TESTBED_PEEKS__RENEW_REPLY" in caught.value.problems[0]
    with pytest.raises(ConfigError) as caught:
        testbed_config_from_args(args, {"PEEKPROXY_TESTBED_PEEKS__RENEW_REPLY__X": "1"})
    assert "PEEKPROXY_TESTBED_PEEKS__RENEW_REPLY__X" in caught.value.problems[0]


def _run_testbed_cli(data_dir: Path, server_name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv_for_testbed(server_name, data_dir),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("damage", ["truncated", "not-a-room", "foreign", "other-key", "tampered"])
def test_damaged_or_foreign_data_dir_stops_the_testbed(tmp_path: Path, damage: str) -> None:
    from signedjson.key import generate_signing_key

    from peekproxy.testbed.rooms import TestbedRoom

    server_name = "localhost:18449"
    rooms = tmp_path / "d" / "rooms"
    rooms.mkdir(parents=True)
    key = generate_signing_key("tb_x")
    room = TestbedRoom.create(
        server_name="other.test" if damage == "foreign" else server_name,
        signing_key=key,
        room_version="11",
        creator="@admin:other.test" if damage == "foreign" else f"@admin:{server_name}",
        now_ms=1_700_000_000_000,
    )
    saved = room.to_json()
    if damage == "tampered":
        saved["events"][2]["content"]["ban"] = 0
    text = json.dumps(saved)
    if damage == "truncated":
        text = text[: len(text) // 2]
    if damage == "not-a-room":
        text = "[1, 2]"
    file = rooms / "room.json"
    file.write_text(text)
    if damage != "other-key":  # the data dir's key signed the room
        with open(tmp_path / "d" / "signing.key", "w") as stream:
            from signedjson.key import write_signing_keys

            write_signing_keys(stream, [key])
    result = _run_testbed_cli(tmp_path / "d", server_name)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"testbed: cannot start: {file}: "), lines
    expected = {
        "truncated": "not valid JSON",
        "not-a-room": "a saved room must be an object",
        "foreign": "belongs to server 'other.test', not 'localhost:18449'",
        "other-key": "fails the checks peers run",
        "tampered": "content hash mismatch",
    }[damage]
    assert expected in lines[0], lines


async def test_alias_directory_follows_canonical_alias(world: World) -> None:
    testbed, name = world.testbed, world.name
    a = await world.create_room(room_version="11", alias="first")
    directory = "/_matrix/federation/v1/query/directory"

    async def resolve(alias: str) -> str | None:
        try:
            answer = await world.peer.client.get_json(
                name, directory, query={"room_alias": f"#{alias}:{name}"}
            )
        except RemoteError as e:
            assert e.status == 404
            return None
        room_id: str = answer["room_id"]
        return room_id

    async with admin(world.listening) as http:

        async def state(room_id: str, content: Any) -> httpx.Response:
            return await http.post(
                f"/rooms/{_room_path(room_id)}/state",
                json={"type": "m.room.canonical_alias", "content": content},
            )

        moved = await state(a, {"alias": f"#second:{name}", "alt_aliases": [f"#third:{name}"]})
        assert moved.status_code == 200, moved.text
        assert testbed.aliases == {f"#second:{name}": a, f"#third:{name}": a}
        assert await resolve("first") is None and await resolve("third") == a
        # another room cannot claim them, neither at creation nor later
        taken = await http.post("/rooms", json={"alias": "second"})
        assert taken.status_code == 409 and taken.json()["errcode"] == "M_ROOM_IN_USE"
        claim = {"type": "m.room.canonical_alias", "content": {"alias": f"#third:{name}"}}
        taken = await http.post("/rooms", json={"initial_state": [claim]})
        assert taken.status_code == 409
        b = await world.create_room(room_version="12", alias="b")
        count = len(testbed.rooms[b].events)
        taken = await state(b, {"alias": f"#b:{name}", "alt_aliases": [f"#third:{name}"]})
        assert taken.status_code == 409 and taken.json()["errcode"] == "M_ROOM_IN_USE"
        assert len(testbed.rooms[b].events) == count  # no event was made
        # malformed aliases are refused, without an event
        for content in (
            {"alias": 5},
            {"alias": "no-sigil"},
            {"alias": "#x:elsewhere.test"},
            {"alt_aliases": f"#x:{name}"},
            {"alt_aliases": [f"#x:{name}", 7]},
        ):
            bad = await state(b, content)
            assert bad.status_code == 400 and bad.json()["errcode"] == "M_INVALID_PARAM", content
        assert len(testbed.rooms[b].events) == count
        # clearing the alias frees it; then another room may take it
        assert (await state(a, {"alt_aliases": [f"#third:{name}"]})).status_code == 200
        assert await resolve("second") is None
        assert (await state(b, {"alias": f"#second:{name}"})).status_code == 200
        assert await resolve("second") == b
        # admin routes taking {roomId} accept an alias too
        summary = await http.get(f"/rooms/{quote(f'#second:{name}', safe='')}")
        assert summary.json()["room_id"] == b
        listed = [r["room_id"] for r in (await http.get("/rooms")).json()["rooms"]]
    assert testbed.aliases == {f"#third:{name}": a, f"#second:{name}": b}
    # after a restart: the same directory, rooms in creation order
    restarted = Testbed(testbed.config, testbed.signing_key, testbed.client, testbed.keyring)
    assert restarted.load_rooms() == 2
    assert restarted.aliases == testbed.aliases
    assert list(restarted.rooms) == listed == [a, b]
    # rooms saved before claims were checked may clash: the newer claim wins
    from peekproxy.testbed.rooms import TestbedRoom

    clash = [
        TestbedRoom.create(
            server_name=name,
            signing_key=testbed.signing_key,
            room_version="11",
            creator=f"@admin:{name}",
            now_ms=now,
            alias=f"#third:{name}",
        )
        for now in (1_600_000_000_000, 1_500_000_000_000)
    ]
    for room in clash:
        testbed._save(room)
    again = Testbed(testbed.config, testbed.signing_key, testbed.client, testbed.keyring)
    assert again.load_rooms() == 4
    assert list(again.rooms) == [clash[1].room_id, clash[0].room_id, a, b]
    assert again.aliases[f"#third:{name}"] == a  # claimed at creation time: the newest
    assert again.aliases[f"#second:{name}"] == b


async def test_admin_refuses_events_peers_would_reject(world: World) -> None:
    name = world.name
    async with admin(world.listening) as http:

        async def error(response: httpx.Response) -> tuple[int, str, str]:
            body = response.json()
            return response.status_code, body.get("errcode", ""), body.get("error", "")

        for spec in (
            {"history_visibility": "public"},
            {"join_rule": "open"},
            {"creator": "Alice"},
            {"creator": "alice smith"},
            {"creator": f"@alice smith:{name}"},
            {
                "initial_state": [
                    {
                        "type": "m.room.member",
                        "state_key": f"@bob:{name}",
                        "content": {"membership": "join"},
                    }
                ]
            },
            {"initial_state": [{"type": "m.room.create", "content": {}}]},
        ):
            status, errcode, _ = await error(await http.post("/rooms", json=spec))
            assert (status, errcode) == (400, "M_INVALID_PARAM"), spec
        refused = await http.post(
            "/rooms", json={"initial_state": [{"type": "m.room.member", "content": {}}]}
        )
        assert "members" in refused.json()["error"]
        room_id = await world.create_room(room_version="10", join_rule="invite")
        room = _room_path(room_id)
        for body in (
            {
                "type": "m.room.member",
                "state_key": f"@bob:{name}",
                "content": {"membership": "invite"},
            },
            {"type": "m.room.create", "content": {"room_version": "10"}},
            {"type": "m.room.history_visibility", "content": {"history_visibility": "all"}},
            {"type": "m.room.join_rules", "content": {"join_rule": "closed"}},
            {"sender": "a b", "type": "m.room.topic", "content": {"topic": "x"}},
        ):
            status, errcode, message = await error(
                await http.post(f"/rooms/{room}/state", json=body)
            )
            assert (status, errcode) == (400, "M_INVALID_PARAM"), body
            if body["type"] == "m.room.member":
                assert "/members/" in message
        status, errcode, _ = await error(
            await http.post(f"/rooms/{room}/members/join", json={"user": "bob smith"})
        )
        assert (status, errcode) == (400, "M_INVALID_PARAM")
        # invites go through the members endpoints
        invited = await http.post(f"/rooms/{room}/members/invite", json={"user": "bob"})
        assert invited.status_code == 200, invited.text
        assert (
            await http.post(f"/rooms/{room}/members/join", json={"user": "bob"})
        ).status_code == 200
        unknown = await http.post(f"/rooms/{room}/members/befriend", json={"user": "bob"})
        assert unknown.status_code == 404
        # power levels must leave the creator in power
        current = world.testbed.rooms[room_id].state_event("m.room.power_levels")
        assert current is not None
        levels = current["content"]
        demoted = {**levels, "users": {f"@admin:{name}": 50}}
        status, errcode, message = await error(
            await http.post(
                f"/rooms/{room}/state", json={"type": "m.room.power_levels", "content": demoted}
            )
        )
        assert (status, errcode) == (400, "M_INVALID_PARAM") and "creator" in message
        v12 = await http.post(
            "/rooms",
            json={
                "room_version": "12",
                "initial_state": [
                    {
                        "type": "m.room.power_levels",
                        "content": {**levels, "users": {f"@admin:{name}": 100}},
                    }
                ],
            },
        )
        assert v12.status_code == 400, v12.text
        assert "authorization rules refuse it" in v12.json()["error"]


async def test_peek_fault_status_and_errcode(world: World) -> None:
    room_id = await world.create_room(room_version="11")
    async with admin(world.listening) as http:
        for bad in (
            {"peek_status": 200},
            {"peek_status": 600},
            {"peek_status": 399},
            {"peek_errcode": "not an errcode"},
            {"peek_errcode": 404},
        ):
            refused = await http.put("/faults", json=bad | {"peek_count": 3})
            assert refused.status_code == 400, bad
        assert (await http.get("/faults")).json()["peek_count"] == 0  # nothing applied
        for errcode in ("M_NOT_FOUND", "M_UNRECOGNIZED", None):
            await http.put(
                "/faults", json={"peek_count": 1, "peek_status": 404, "peek_errcode": errcode}
            )
            with pytest.raises(RemoteError) as caught:
                await world.peek(room_id)
            assert (caught.value.status, caught.value.errcode) == (404, errcode or "M_UNKNOWN")
        await http.put("/faults", json={"peek_count": 1, "peek_status": 429})
        with pytest.raises(RemoteError) as caught:
            await world.peek(room_id)
        assert (caught.value.status, caught.value.errcode) == (429, "M_LIMIT_EXCEEDED")
    assert "state" in await world.peek(room_id)


async def test_server_acl_applies_to_every_read_endpoint(world: World) -> None:
    room_id = await world.create_room(room_version="10")
    first = await world.send(room_id, "one")
    await world.peek(room_id)
    async with admin(world.listening) as http:
        acl = await http.post(
            f"/rooms/{_room_path(room_id)}/state",
            json={"type": "m.room.server_acl", "content": {"allow": ["*"], "deny": ["localhost"]}},
        )
        assert acl.status_code == 200
    # the ACL event is still pushed, then the denied server's peek ends
    await world.peer.wait_for_pdus(1)
    assert world.testbed.peeks.active(world.testbed.clock_ms()) == []
    assert world.testbed.peek_log[-1][0] == "end"
    client, name, fed = world.peer.client, world.name, "/_matrix/federation/v1"
    room = path_segment(room_id)
    requests = [
        client.get_json(name, f"{fed}/event/{path_segment(first)}"),
        client.get_json(name, f"{fed}/state/{room}"),
        client.get_json(name, f"{fed}/state_ids/{room}"),
        client.get_json(name, f"{fed}/backfill/{room}", query={"v": [first], "limit": "5"}),
        client.post_json(
            name,
            f"{fed}/get_missing_events/{room}",
            {"earliest_events": [], "latest_events": [first], "limit": 5, "min_depth": 0},
        ),
        world.peek(room_id),
    ]
    for request in requests:
        with pytest.raises(RemoteError) as caught:
            await request
        assert (caught.value.status, caught.value.errcode) == (403, "M_FORBIDDEN")


@pytest.mark.parametrize("peek_id", ["a/b", "x/renew", "renew", "//", "ü %2F"])
async def test_peek_ids_with_slashes(world: World, peek_id: str) -> None:
    room_id = await world.create_room(room_version="12")
    assert "state" in await world.peek(room_id, peek_id=peek_id)
    assert world.testbed.peek_log[-1] == ("start", world.peer.name, room_id, peek_id)
    renew = f"/_matrix/federation/v1/peek/{path_segment(room_id)}/{path_segment(peek_id)}/renew"
    assert await world.peer.client.post_json(world.name, renew, {}) == {
        "renewal_interval": 3_600_000
    }
    assert await world.delete(room_id, peek_id) == {}
    assert "state" in await world.peek(room_id, peek_id=peek_id)
    async with admin(world.listening) as http:
        expired = await http.delete(
            f"/peeks/{world.peer.name}/{_room_path(room_id)}/{quote(peek_id, safe='')}"
        )
    assert expired.status_code == 200, expired.text
    assert world.testbed.peek_log[-1] == ("expire", world.peer.name, room_id, peek_id)


async def test_peek_body_must_be_an_object(world: World) -> None:
    room_id = await world.create_room(room_version="11")
    path = f"/_matrix/federation/v1/peek/{path_segment(room_id)}/p1"
    bodies: list[Any] = [[], "x", 1]
    for body in bodies:
        with pytest.raises(RemoteError) as caught:
            await world.peer.client.put_json(world.name, path, body, query={"ver": ["11"]})
        assert (caught.value.status, caught.value.errcode) == (400, "M_BAD_JSON")
    with pytest.raises(RemoteError) as caught:  # a PUT on the renew path is not a route
        await world.peer.client.put_json(world.name, f"{path}/renew", {})
    assert (caught.value.status, caught.value.errcode) == (404, "M_UNRECOGNIZED")


async def test_outbox_shows_retries_and_given_up_transactions(world: World) -> None:
    room_id = await world.create_room(room_version="11")
    await world.peek(room_id)
    sender = world.testbed.senders[world.peer.name]
    world.peer.send_status = 500
    retried = await world.send(room_id, "retried")
    await world.testbed.wait_until(
        lambda: sender.sending is not None and sender.sending.attempts >= 2
    )
    async with admin(world.listening) as http:
        outbox = (await http.get("/outbox")).json()[world.peer.name]
        assert outbox["pending"] == 0 and outbox["transactions"] == []
        sending = outbox["sending"]
        assert sending["event_ids"] == [retried] and sending["attempts"] >= 2
        assert "HTTP 500" in sending["last_error"]
        world.peer.send_status = 200
        await world.testbed.wait_until(lambda: bool(sender.transactions))
        await sender.wait_idle()
        txns = world.peer.transactions
        assert len({t["txn_id"] for t in txns}) == 1  # retried with the same txnId
        # a 4xx other than 429 is not retried: the transaction is given up
        world.peer.send_status = 403
        given_up = await world.send(room_id, "refused")
        await world.testbed.wait_until(lambda: len(sender.transactions) == 2)
        world.peer.send_status = 200
        after = await world.send(room_id, "after")
        await world.peer.wait_for_pdus(len(world.peer.pdus) + 1)
        await sender.wait_idle()
        outbox = (await http.get("/outbox")).json()[world.peer.name]
    statuses = [(t["event_ids"], t["status"]) for t in outbox["transactions"]]
    assert statuses[0] == ([retried], "sent")
    assert statuses[1][0] == [given_up] and statuses[1][1].startswith("failed: HTTP 403")
    assert statuses[2] == ([after], "sent") and outbox["sending"] is None


async def test_edus_and_remote_servers_users(world: World) -> None:
    """Typing and receipts for users of any server go to the room's peekers (issue 10 item
    8); users of a simulated remote server join with that server's signature, and rooms
    holding their events load again after a restart."""
    room_id = await world.create_room(room_version="10")
    room = quote(room_id, safe="")
    async with admin(world.listening) as http:
        unknown = await http.post(f"/rooms/{room}/members/join", json={"user": "@bob:other.test"})
        assert unknown.status_code == 400  # not a user of this server, nor of a simulated one
        bad = await http.post("/remote_servers", json={"server_name": "not a name"})
        assert bad.status_code == 400 and bad.json()["errcode"] == "M_INVALID_PARAM"
        own = await http.post("/remote_servers", json={"server_name": world.name})
        assert own.status_code == 400
        added = await http.post("/remote_servers", json={"server_name": "other.test"})
        assert added.status_code == 200
        document = added.json()["remote_servers"]["other.test"]
        assert document["server_name"] == "other.test" and document["verify_keys"]
        joined = await http.post(f"/rooms/{room}/members/join", json={"user": "@bob:other.test"})
        assert joined.status_code == 200, joined.text
        join_pdu = world.testbed.rooms[room_id].event(joined.json()["event_id"])
        assert join_pdu is not None and set(join_pdu["signatures"]) == {"other.test"}

        await world.peek(room_id)
        typing = await http.post(f"/rooms/{room}/typing", json={"user": "@carol:far.test"})
        assert typing.json() == {"destinations": [world.peer.name]}
        message = await world.send(room_id, "read me")
        receipt = await http.post(
            f"/rooms/{room}/receipt", json={"user": "@bob:other.test", "event_id": message}
        )
        assert receipt.status_code == 200
        stops = await http.post(f"/rooms/{room}/typing", json={"user": "alice", "typing": False})
        assert stops.status_code == 200
        assert (await http.post(f"/rooms/{room}/typing", json={"user": "@x"})).status_code == 400
        await world.testbed.senders[world.peer.name].wait_idle()
        outbox = (await http.get("/outbox")).json()[world.peer.name]["transactions"]
    edus = [edu for t in world.peer.transactions for edu in t["body"].get("edus", [])]
    assert edus[0] == {
        "edu_type": "m.typing",
        "content": {"room_id": room_id, "user_id": "@carol:far.test", "typing": True},
    }
    assert edus[1]["edu_type"] == "m.receipt"
    assert edus[1]["content"][room_id]["m.read"]["@bob:other.test"]["event_ids"] == [message]
    assert edus[2]["content"]["user_id"] == f"@alice:{world.name}"
    assert edus[2]["content"]["typing"] is False
    assert [e for t in outbox for e in t["edu_types"]] == ["m.typing", "m.receipt", "m.typing"]
    # A restarted testbed loads the room with the remote user's join (and the key).
    restarted = Testbed(
        world.testbed.config, world.testbed.signing_key, world.testbed.client, world.testbed.keyring
    )
    assert restarted.load_rooms() >= 1
    assert restarted.rooms[room_id].membership("@bob:other.test") == "join"
    assert set(restarted.remote_keys) == {"other.test"}


async def test_relay_illegal_fault(world: World) -> None:
    """The admin API makes illegal events only with the fault on, refuses legal ones, and
    pushes the illegal ones to the peeker; the peek answer and the state ignore them."""
    room_id = await world.create_room(room_version="12")
    room = _room_path(room_id)
    await world.peek(room_id)
    async with admin(world.listening) as http:
        body = {"kind": "non_member_message"}
        off = await http.post(f"/rooms/{room}/illegal", json=body)
        assert (off.status_code, off.json()["errcode"]) == (403, "M_FORBIDDEN")
        assert (await http.put("/faults", json={"relay_illegal": 2})).status_code == 400
        assert (await http.put("/faults", json={"relay_illegal": 1})).json()["relay_illegal"] == 1
        for bad in (
            {"kind": "nonsense"},
            {"kind": "ban", "sender": "admin", "target": "bob"},  # the creator may: legal
            {"kind": "cites_create", "target": "bob"},
        ):
            refused = await http.post(f"/rooms/{room}/illegal", json=bad)
            assert (refused.status_code, refused.json()["errcode"]) == (400, "M_INVALID_PARAM")
        made = []
        for kind in ("non_member_message", "cites_create"):
            answer = await http.post(f"/rooms/{room}/illegal", json={"kind": kind})
            assert answer.status_code == 200, answer.text
            made.append(answer.json()["event_id"])
            assert answer.json()["reason"]
        after = await world.send(room_id, "legal")
        listed = (await http.get(f"/rooms/{room}/events")).json()["events"]
    pdus = await world.peer.wait_for_pdus(3)
    assert [p["content"]["body"] for p in pdus][-1] == "legal"
    assert [e["event_id"] for e in listed if "rejected" in e] == made
    assert world.testbed.rooms[room_id].latest()[0] == after
    answer = await world.peek(room_id, "another")
    verdicts = [e for e in answer["state"] + answer["auth_chain"] if e.get("sender")]
    assert all("mallory" not in e["sender"] for e in verdicts)

"""Keyring: key documents from origins and notaries, caching, persistence, validity."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json

from peekproxy.config import DEFAULT_IP_RANGE_BLACKLIST
from peekproxy.core.room_versions import room_version
from peekproxy.core.subscription import Subscription, SubState
from peekproxy.federation.client import FederationClient, build_ssl_context
from peekproxy.federation.discovery import DnspythonLookup
from peekproxy.federation.ip_policy import IpFilter
from peekproxy.federation.keyring import (
    KEY_VALIDITY_CAP_MS,
    KeyFetchError,
    Keyring,
    StoredKey,
    TrustedNotary,
    parse_key_document,
)
from peekproxy.federation.signing_key import server_key_document
from peekproxy.services.assembly import PeekSettings, build_services
from peekproxy.services.settings import LiveSettings
from peekproxy.store.sqlite import open_sqlite
from peekproxy.testbed.rooms import TestbedRoom
from tests.faulty_store import FaultyStorage
from tests.support import JsonApp, serve_app

NOW_MS = int(time.time() * 1000)
DAY_MS = 86_400_000


def _client(ca: Path, *, server_name: str | None = None) -> FederationClient:
    return FederationClient(
        server_name=server_name,
        signing_key=generate_signing_key("me") if server_name else None,
        dns=DnspythonLookup(),
        ip_filter=IpFilter(
            [ipaddress.ip_network(n) for n in DEFAULT_IP_RANGE_BLACKLIST],
            [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")],
        ),
        ssl_context=build_ssl_context(True, ca),
        connect_timeout=5,
        request_timeout=10,
    )


class KeyServer:
    """A remote server publishing its key document (changeable by the test)."""

    def __init__(self) -> None:
        self.key = generate_signing_key("k1")
        self.name = ""
        self.valid_for_ms = DAY_MS
        self.old: dict[str, tuple[str, int]] = {}
        self.fetches = 0
        #: ``valid_for_ms`` of the next answers, one per fetch (then it stays at the last).
        self.validity_answers: list[int] = []

    def document(self) -> dict[str, Any]:
        return server_key_document(
            self.name,
            self.key,
            now_ms=int(time.time() * 1000),
            valid_for_ms=self.valid_for_ms,
            old_verify_keys=self.old,
        )

    async def handler(self, scope: Any, body: bytes) -> tuple[int, Any]:
        self.fetches += 1
        if self.validity_answers:
            self.valid_for_ms = self.validity_answers.pop(0)
        return 200, self.document()


async def _key_server(nursery: trio.Nursery, tls: tuple[Path, Path, Path]) -> KeyServer:
    server = KeyServer()
    url = await serve_app(
        nursery, JsonApp({("GET", "/_matrix/key/v2/server"): server.handler}), tls=(tls[0], tls[1])
    )
    server.name = f"localhost:{url.rsplit(':', 1)[1]}"
    return server


def test_parse_key_document_checks_name_and_self_signature() -> None:
    key = generate_signing_key("a")
    document = server_key_document(
        "a.test",
        key,
        now_ms=NOW_MS,
        valid_for_ms=DAY_MS,
        old_verify_keys={"ed25519:old": ("b2xk" * 10 + "b2k", 5)},
    )
    keys = parse_key_document(document, "a.test", NOW_MS)
    assert keys["ed25519:a"].valid_until_ts == NOW_MS + DAY_MS
    assert keys["ed25519:old"].expired_ts == 5 and keys["ed25519:old"].is_old
    with pytest.raises(KeyFetchError, match=r"not 'b\.test'"):
        parse_key_document(document, "b.test", NOW_MS)
    forged = dict(document, valid_until_ts=NOW_MS + 365 * DAY_MS)
    with pytest.raises(KeyFetchError, match=r"not signed by a\.test"):
        parse_key_document(forged, "a.test", NOW_MS)
    other = sign_json(
        {k: v for k, v in document.items() if k != "signatures"},
        "a.test",
        generate_signing_key("zz"),
    )
    with pytest.raises(KeyFetchError, match="not signed"):
        parse_key_document(other, "a.test", NOW_MS)


def test_validity_is_capped_at_seven_days_after_the_fetch() -> None:
    key = get_verify_key(generate_signing_key("a"))
    far = StoredKey("a.test", "ed25519:a", key, NOW_MS + 365 * DAY_MS, None, NOW_MS)
    assert far.effective_valid_until_ts == NOW_MS + KEY_VALIDITY_CAP_MS
    assert far.info().valid_until_ts == NOW_MS + KEY_VALIDITY_CAP_MS
    near = StoredKey("a.test", "ed25519:a", key, NOW_MS + DAY_MS, None, NOW_MS)
    assert near.info().valid_until_ts == NOW_MS + DAY_MS
    old = StoredKey("a.test", "ed25519:o", key, 0, NOW_MS - DAY_MS, NOW_MS)
    assert old.info().expired_ts == NOW_MS - DAY_MS and old.info().valid_until_ts is None


async def test_fetch_cache_persist_and_reload(
    nursery: trio.Nursery, tls_files: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    remote = await _key_server(nursery, tls_files)
    store = await open_sqlite(tmp_path / "p.db", "me.test")
    keyring = Keyring(_client(tls_files[2]), store)
    await keyring.fetch_keys(remote.name, ["ed25519:k1"])
    info = keyring.lookup(remote.name, "ed25519:k1")
    assert info is not None
    assert info.verify_key.encode() == get_verify_key(remote.key).encode()
    await keyring.fetch_keys(remote.name, ["ed25519:k1"])
    assert remote.fetches == 1  # answered from the cache
    # A key wanted beyond its cached validity is fetched again...
    remote.valid_for_ms = 3 * DAY_MS
    await keyring.fetch_keys(
        remote.name, ["ed25519:k1"], minimum_valid_until_ts=NOW_MS + 2 * DAY_MS
    )
    assert remote.fetches == 2
    # ...and when the server cannot vouch for long enough, that is an error.
    with pytest.raises(KeyFetchError, match="valid until"):
        await keyring.fetch_keys(
            remote.name, ["ed25519:k1"], minimum_valid_until_ts=NOW_MS + 5 * DAY_MS
        )
    # Unknown key ID: fetched, still missing, and the error says what was tried.
    with pytest.raises(KeyFetchError, match=r"did not publish ed25519:nope"):
        await keyring.fetch_keys(remote.name, ["ed25519:nope"])

    reloaded = Keyring(_client(tls_files[2]), store)
    assert await reloaded.load() == 1
    assert reloaded.lookup(remote.name, "ed25519:k1") is not None
    await store.aclose()


async def test_keys_fetched_while_the_database_is_away_still_verify(
    nursery: trio.Nursery, tls_files: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Saving fetched keys fails (StoreUnavailable, issue 16): the fetch still succeeds
    and the key verifies from memory; the request that needed it is not failed."""
    remote = await _key_server(nursery, tls_files)
    store = FaultyStorage(await open_sqlite(tmp_path / "p.db", "me.test"))
    keyring = Keyring(_client(tls_files[2]), store)
    store.down = True
    await keyring.fetch_keys(remote.name, ["ed25519:k1"])
    assert store.refused == 1
    assert keyring.lookup(remote.name, "ed25519:k1") is not None
    await store.aclose()


async def test_first_seen_wins_and_old_keys_do_not_sign_requests(
    nursery: trio.Nursery, tls_files: tuple[Path, Path, Path]
) -> None:
    remote = await _key_server(nursery, tls_files)
    keyring = Keyring(_client(tls_files[2]))
    first = await keyring.request_key(remote.name, "ed25519:k1")
    # The remote now claims a different key under the same ID: ignored.
    impostor = generate_signing_key("k1")
    remote.key = impostor
    remote.valid_for_ms = 3 * DAY_MS
    with pytest.raises(KeyFetchError):  # the only key with enough validity is the impostor
        await keyring.fetch_keys(
            remote.name, ["ed25519:k1"], minimum_valid_until_ts=NOW_MS + 2 * DAY_MS
        )
    assert remote.fetches == 2
    again = await keyring.request_key(remote.name, "ed25519:k1")
    assert again.encode() == first.encode()
    # A retired key is fine for old events but never for requests.
    remote.key = generate_signing_key("k2")
    remote.old = {"ed25519:gone": (encode_verify_key_base64(get_verify_key(impostor)), 1)}
    await keyring.fetch_keys(remote.name, ["ed25519:k2"])
    with pytest.raises(KeyFetchError, match="retired"):
        await keyring.request_key(remote.name, "ed25519:gone")


async def test_notary_is_asked_when_the_origin_is_unreachable(
    nursery: trio.Nursery, tls_files: tuple[Path, Path, Path]
) -> None:
    origin_key = generate_signing_key("o1")
    origin_name = "localhost:1"  # nothing listens on port 1
    notary_key = generate_signing_key("n1")
    asked: list[Any] = []
    forge = {"on": False}

    async def query(scope: Any, body: bytes) -> tuple[int, Any]:
        import json

        asked.append(json.loads(body))
        document = server_key_document(origin_name, origin_key, now_ms=NOW_MS, valid_for_ms=DAY_MS)
        signer = generate_signing_key("n1") if forge["on"] else notary_key
        return 200, {"server_keys": [sign_json(document, notary_name, signer)]}

    url = await serve_app(
        nursery,
        JsonApp({("POST", "/_matrix/key/v2/query"): query}),
        tls=(tls_files[0], tls_files[1]),
    )
    notary_name = f"localhost:{url.rsplit(':', 1)[1]}"
    notary = TrustedNotary(
        notary_name, {"ed25519:n1": encode_verify_key_base64(get_verify_key(notary_key))}
    )
    keyring = Keyring(_client(tls_files[2]), notaries=[notary])
    await keyring.fetch_keys(origin_name, ["ed25519:o1"], minimum_valid_until_ts=NOW_MS)
    assert keyring.lookup(origin_name, "ed25519:o1") is not None
    criteria = asked[0]["server_keys"][origin_name]["ed25519:o1"]
    assert criteria["minimum_valid_until_ts"] == NOW_MS

    forge["on"] = True
    fresh = Keyring(_client(tls_files[2]), notaries=[notary])
    with pytest.raises(KeyFetchError) as caught:
        await fresh.fetch_keys(origin_name, ["ed25519:o1"])
    message = str(caught.value)
    assert origin_name in message and f"notary {notary_name}" in message
    assert "not signed by the notary" in message


async def test_abuse_limits(nursery: trio.Nursery, tls_files: tuple[Path, Path, Path]) -> None:
    remote = await _key_server(nursery, tls_files)
    keyring = Keyring(_client(tls_files[2]))
    for bad in ("rsa:k1", "k1", "ed25519:", "ed25519:a-b"):
        with pytest.raises(KeyFetchError, match="not an ed25519 key ID"):
            await keyring.request_key(remote.name, bad)
    assert remote.fetches == 0  # refused before any network call
    with pytest.raises(KeyFetchError, match="did not publish ed25519:other"):
        await keyring.request_key(remote.name, "ed25519:other")
    with pytest.raises(KeyFetchError, match="when last asked"):
        await keyring.request_key(remote.name, "ed25519:other")
    assert remote.fetches == 1  # the miss is remembered for a while
    with pytest.raises(KeyFetchError, match="cannot get keys of localhost:1"):
        await keyring.request_key("localhost:1", "ed25519:a")
    with pytest.raises(KeyFetchError, match="not retried for"):
        await keyring.request_key("localhost:1", "ed25519:a")


async def test_unpinned_unreachable_notary_is_an_error_not_a_loop(
    tls_files: tuple[Path, Path, Path],
) -> None:
    notary = TrustedNotary("localhost:2", {})  # keys not pinned, and nobody answers there
    keyring = Keyring(_client(tls_files[2]), notaries=[notary])
    with pytest.raises(KeyFetchError) as caught:
        await keyring.fetch_keys("localhost:1", ["ed25519:a"])
    assert "notary localhost:2" in str(caught.value)


# -- keys valid at an event's origin_server_ts (room versions 5+) ----------------------------

MINUTE_MS = 60_000


async def _ingest_later_event(
    remote: KeyServer, tmp_path: Path, ca: Path, notaries: list[TrustedNotary] | None = None
) -> tuple[Keyring, int, Any]:
    """peekproxy's /send ingest (in process, real store, keys fetched over TLS) of a v10 room
    of ``remote``: first the events that create it, sent now (their key is fetched then),
    then a message stamped 10 minutes from now. Returns the keyring, the message's
    ``origin_server_ts`` and the /send answer for it."""
    now = int(time.time() * 1000)
    later_ts = now + 10 * MINUTE_MS
    store = await open_sqlite(tmp_path / "p.db", "me.test")
    client = _client(ca, server_name="me.test")
    keyring = Keyring(client, store, notaries or [])
    service = build_services(
        store=store,
        client=client,
        keyring=keyring,
        settings=PeekSettings(
            linger_ms=0,
            renewal_max_ms=1_800_000,
            live=LiveSettings(max_peeks_per_device=10, max_remote_peeks=10),
        ),
    )
    room = TestbedRoom.create(
        server_name=remote.name,
        signing_key=remote.key,
        room_version="10",
        creator=f"@admin:{remote.name}",
        now_ms=now,
    )
    service.subscriptions.by_room[room.room_id] = Subscription(
        room.room_id, SubState.ACTIVE, (remote.name,), "10", remote.name, "peek0001"
    )
    first = await service.ingest.receive(remote.name, "t1", {"pdus": room.events})
    assert all(v == {} for v in first["pdus"].values()), first
    assert remote.fetches == 1
    later, pdu = room.send(
        remote.key,
        sender=f"@admin:{remote.name}",
        type="m.room.message",
        content={"msgtype": "m.text", "body": "ten minutes later"},
        now_ms=later_ts,
    )
    answer = await service.ingest.receive(remote.name, "t2", {"pdus": [pdu]})
    return keyring, later_ts, answer["pdus"][later]


async def test_a_key_expiring_before_an_event_is_fetched_again_from_the_origin(
    nursery: trio.Nursery, tls_files: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    remote = await _key_server(nursery, tls_files)
    remote.validity_answers = [5 * MINUTE_MS, DAY_MS]  # 5 minutes at first, then a day
    keyring, later_ts, result = await _ingest_later_event(remote, tmp_path, tls_files[2])
    assert result == {}  # accepted: the key was fetched again, now valid for a day
    assert remote.fetches == 2
    info = keyring.lookup(remote.name, "ed25519:k1")
    assert info is not None and info.valid_until_ts is not None
    assert info.valid_until_ts > later_ts


async def test_then_a_notary_is_asked_with_minimum_valid_until_ts(
    nursery: trio.Nursery, tls_files: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    import json

    remote = await _key_server(nursery, tls_files)
    remote.valid_for_ms = 5 * MINUTE_MS  # every answer of the origin's: 5 minutes
    notary_key = generate_signing_key("n1")
    asked: list[Any] = []

    async def query(scope: Any, body: bytes) -> tuple[int, Any]:
        asked.append(json.loads(body))
        # The notary holds an older answer of the origin's that is valid for longer.
        long = server_key_document(
            remote.name, remote.key, now_ms=int(time.time() * 1000), valid_for_ms=DAY_MS
        )
        return 200, {"server_keys": [sign_json(long, notary_name, notary_key)]}

    url = await serve_app(
        nursery,
        JsonApp({("POST", "/_matrix/key/v2/query"): query}),
        tls=(tls_files[0], tls_files[1]),
    )
    notary_name = f"localhost:{url.rsplit(':', 1)[1]}"
    notary = TrustedNotary(
        notary_name, {"ed25519:n1": encode_verify_key_base64(get_verify_key(notary_key))}
    )
    _, later_ts, result = await _ingest_later_event(remote, tmp_path, tls_files[2], [notary])
    assert result == {}
    assert remote.fetches == 2  # the origin first, then the notary
    [request] = asked
    assert request["server_keys"][remote.name]["ed25519:k1"] == {"minimum_valid_until_ts": later_ts}


async def test_an_event_after_every_known_validity_is_rejected_and_not_refetched_at_once(
    nursery: trio.Nursery, tls_files: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    remote = await _key_server(nursery, tls_files)
    remote.valid_for_ms = 5 * MINUTE_MS  # every answer: 5 minutes; and no notary
    keyring, later_ts, result = await _ingest_later_event(remote, tmp_path, tls_files[2])
    assert "key not valid at origin_server_ts" in result["error"]
    assert remote.fetches == 2
    # Another event needing the same validity within a minute: no new fetch.
    problems = await keyring.fetch_signer_keys(
        [
            {
                "sender": f"@admin:{remote.name}",
                "origin_server_ts": later_ts,
                "signatures": {remote.name: {"ed25519:k1": "x"}},
            }
        ],
        room_version("10"),
    )
    assert problems and "when last asked" in problems[0]
    assert remote.fetches == 2

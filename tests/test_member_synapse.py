"""A real Synapse asks peekproxy what it asks a member of a room (issue 13, research §5-§6).

peekproxy's federation app runs in the test process over TLS with a server name Synapse can
reach (``localhost:<port>``); its observer joins a world_readable room of the session's
Synapse with ``make_join``/``send_join`` v2 signed by our key, and the room is followed as an
observed room (a ``join:`` handle). Then:

* the observer sends a message whose ``prev_events`` Synapse lacks: Synapse asks us
  ``get_missing_events`` and takes the missing event from our answer (alice sees both);
* alice queries the observer's device keys and profile: Synapse asks ``/user/devices`` and
  ``/query/profile`` and gives alice our answers, with no failures (a 404 would make Synapse
  retry every 30 s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import trio
import trustme
from signedjson.key import generate_signing_key

from peekproxy.core.events import compute_event_id
from peekproxy.core.membership import sign_event
from peekproxy.core.room_versions import RoomVersion, room_version
from peekproxy.federation.client import path_segment
from peekproxy.services.settings import ObserverSettings
from peekproxy.store.sqlite import open_sqlite
from tests.front_support import Account, sync
from tests.member_support import DEVICE, Followings, RoomView, Snapshot, now_ms, serve_member
from tests.peer import loopback_client
from tests.support import issue_cert
from tests.synapse import Synapse, free_tcp_port

OUR_KEY = generate_signing_key("o1")


def _signed(fields: dict[str, Any], rules: RoomVersion, server_name: str) -> tuple[str, Any]:
    """(event ID, PDU): ``fields`` hashed and signed by ``server_name`` with our key."""
    pdu = sign_event(fields, rules, server_name, OUR_KEY)
    return compute_event_id(pdu, rules), pdu


async def test_synapse_reads_from_the_observer_and_asks_about_it(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    port = free_tcp_port()
    our = f"localhost:{port}"
    observer = ObserverSettings(
        user_id=f"@peekproxy:{our}", joins=True, displayname="peekproxy observer"
    )
    ca_file = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    client = loopback_client(ca_file, our, OUR_KEY)
    store = await open_sqlite(tmp_path / "p.db", our)
    follower = Followings(synapse.server_name, {}, set())
    asked: list[tuple[str, str]] = []
    services, _ = await serve_member(
        nursery,
        store=store,
        client=client,
        follower=follower,
        server_name=our,
        signing_key=OUR_KEY,
        observer=observer,
        bind=f"127.0.0.1:{port}",
        tls=issue_cert(tls_ca, tmp_path, "localhost"),
        requests=asked,
    )
    alice = Account(synapse, f"member-alice-{port}")
    room_id = await alice.create_room(version="10")
    since = (await sync(synapse.client, alice.token))["next_batch"]

    # The observer joins (make_join, send_join v2), as the observer join follower does.
    room, user = path_segment(room_id), path_segment(observer.user_id)
    template = await client.get_json(
        synapse.server_name, f"/_matrix/federation/v1/make_join/{room}/{user}", query={"ver": "10"}
    )
    rules = room_version(template["room_version"])
    join_id, join = _signed(
        {
            **template["event"],
            "content": {"membership": "join", "displayname": observer.displayname},
        },
        rules,
        our,
    )
    answer = await client.put_json(
        synapse.server_name,
        f"/_matrix/federation/v2/send_join/{room}/{path_segment(join_id)}",
        join,
    )
    events = {compute_event_id(p, rules): p for p in answer["state"] + answer["auth_chain"]}
    state_ids = [compute_event_id(p, rules) for p in answer["state"]]
    state = {(events[e]["type"], events[e]["state_key"]): e for e in state_ids}
    state[("m.room.member", observer.user_id)] = join_id
    events[join_id] = join
    follower.views[room_id] = RoomView(Snapshot("10", events, frozenset(), state, join_id), [])
    follower.observed.add(room_id)
    assert await services.syncing.peek(*DEVICE, room_id) == room_id

    # Two messages of the observer; Synapse is sent only the second.
    auth = [state[("m.room.create", "")], state[("m.room.power_levels", "")], join_id]
    sent: list[tuple[str, dict[str, Any]]] = []
    for body in ("first, never sent", "second"):
        prev = sent[-1] if sent else (join_id, join)
        sent.append(
            _signed(
                {
                    "room_id": room_id,
                    "sender": observer.user_id,
                    "type": "m.room.message",
                    "content": {"msgtype": "m.text", "body": body},
                    "depth": prev[1]["depth"] + 1,
                    "prev_events": [prev[0]],
                    "auth_events": auth,
                    "origin_server_ts": now_ms(),
                },
                rules,
                our,
            )
        )
    await store.write(
        lambda tx: [
            tx.append_event(room_id, e, p, redacted=False, now_ms=now_ms()) for e, p in sent
        ]
    )
    txn = {"origin": our, "origin_server_ts": now_ms(), "pdus": [sent[1][1]]}
    await client.put_json(synapse.server_name, f"/_matrix/federation/v1/send/{now_ms()}", txn)

    seen: list[str] = []
    with trio.fail_after(30):
        while "second" not in seen:
            synced = await sync(synapse.client, alice.token, since=since, timeout_ms=5000)
            since = synced["next_batch"]
            timeline = synced.get("rooms", {}).get("join", {}).get(room_id, {}).get("timeline", {})
            seen += [e["content"].get("body") for e in timeline.get("events", [])
                     if e["type"] == "m.room.message"]  # fmt: skip
    assert seen == ["first, never sent", "second"]
    assert ("POST", f"/_matrix/federation/v1/get_missing_events/{room_id}") in asked

    keys = await alice.call("POST", "/keys/query", {"device_keys": {observer.user_id: []}})
    assert keys["device_keys"] == {observer.user_id: {}} and keys["failures"] == {}
    assert ("GET", f"/_matrix/federation/v1/user/devices/{observer.user_id}") in asked
    profile = await alice.call("GET", f"/profile/{quote(observer.user_id, safe='')}")
    assert profile["displayname"] == "peekproxy observer"
    await client.aclose()
    await store.aclose()

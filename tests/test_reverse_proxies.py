"""The shipped reverse-proxy configurations (contrib/nginx, contrib/caddy; docs/reverse-proxy.md)
run by the real nginx and Caddy: which upstream each route reaches, requests passed unchanged,
the fallback to the homeserver when peekproxy is down or failing, long-polls not cut, Matrix
errors when no upstream answers, and Element's SDK syncing through nginx."""

from __future__ import annotations

import re
import signal
import time
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio

from tests.conftest import Spawn
from tests.front_support import auth, bodies, client_api, create_room, send_text
from tests.js_sdk import JsSession, login, node_harness
from tests.peek_world import TESTBED
from tests.proxies import CADDYFILE, KINDS, NGINX_CONF, Fronted, StartProxy, address
from tests.support import JsonApp, serve_app
from tests.synapse import REPO, Synapse, free_tcp_port


def dead_address() -> str:
    """A loopback address nothing listens on (a peekproxy or homeserver that is down)."""
    return f"127.0.0.1:{free_tcp_port()}"


class Recorder:
    """An upstream that answers every request with what it received (raw path, query,
    headers) and a status the test sets per path prefix: shows exactly what a proxy sends."""

    def __init__(self, name: str, headers: dict[str, str] | None = None) -> None:
        self.name = name
        self.headers = headers or {}  # sent with every answer
        self.seen: list[str] = []
        self.status: dict[str, tuple[int, Any]] = {}

    async def answer(self, scope: Any, body: bytes) -> tuple[int, Any, dict[str, str]]:
        raw = scope["raw_path"].decode()
        self.seen.append(raw)
        for prefix, (status, payload) in self.status.items():
            if raw.startswith(prefix):
                return status, payload, self.headers
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        query = scope["query_string"].decode()
        seen = {"by": self.name, "path": raw, "query": query, "headers": headers}
        return 200, seen, self.headers

    async def serve(self, nursery: trio.Nursery) -> str:
        methods = ("GET", "POST", "PUT", "DELETE", "OPTIONS")
        app = JsonApp({(m, "/*"): self.answer for m in methods})
        return address(await serve_app(nursery, app))


# -- the configurations against recording upstreams -----------------------------------------


def test_docs_show_the_shipped_configurations() -> None:
    """docs/reverse-proxy.md reproduces both contrib/ files exactly (they are what the tests
    below run)."""
    docs = (REPO / "docs" / "reverse-proxy.md").read_text()
    for language, path in (("nginx", NGINX_CONF), ("caddy", CADDYFILE)):
        assert f"```{language}\n{path.read_text()}```" in docs, path


ROUTES = {
    # path (as a client sends it) -> the upstream that must get it
    "/_matrix/client/v3/sync?since=s1_2&timeout=30000": "peekproxy",
    "/_matrix/client/r0/sync": "peekproxy",
    "/_matrix/client/v3/peek/%21room%3Ahs.test?server_name=hs.test": "peekproxy",
    "/_matrix/client/r0/peek/%23alias%3Ahs.test": "peekproxy",
    "/_matrix/client/unstable/org.matrix.msc2753/peek_room": "peekproxy",
    "/_matrix/client/v3/rooms/%21room%3Ahs.test/unpeek": "peekproxy",
    "/_matrix/client/unstable/org.matrix.msc2753/rooms/!room:hs.test/unpeek": "peekproxy",
    "/_matrix/client/v3/rooms/%21room%3Ahs.test/messages?dir=b&from=t1": "peekproxy",
    "/_matrix/client/r0/rooms/%21room%3Ahs.test/state": "peekproxy",
    "/_matrix/client/v3/rooms/!room:hs.test/event/$abc%2Fdef+ghi": "peekproxy",
    "/_matrix/client/v3/versions": "homeserver",
    "/_matrix/client/v3/login": "homeserver",
    "/_matrix/client/v3/rooms/%21room%3Ahs.test/state/m.room.name/": "homeserver",
    "/_matrix/client/v3/rooms/%21room%3Ahs.test/send/m.room.message/t1": "homeserver",
    "/_matrix/client/v3/rooms/%21room%3Ahs.test/members": "homeserver",
    "/_matrix/client/v3/syncs": "homeserver",
    "/_synapse/client/new_user_consent": "homeserver",
}


@pytest.mark.parametrize("kind", KINDS)
async def test_each_route_reaches_its_upstream_unchanged(
    kind: str, nursery: trio.Nursery, reverse_proxies: StartProxy
) -> None:
    homeserver, peekproxy = Recorder("homeserver"), Recorder("peekproxy")
    proxy = await reverse_proxies(
        kind, homeserver=await homeserver.serve(nursery), peekproxy=await peekproxy.serve(nursery)
    )
    async with httpx.AsyncClient(base_url=proxy.url) as http:
        for path, upstream in ROUTES.items():
            method = "PUT" if "/send/" in path else "POST" if "peek" in path else "GET"
            response = await http.request(
                method, path, headers={"X-Forwarded-For": "203.0.113.9"}, content=b"{}"
            )
            assert response.status_code == 200, (path, response.text)
            seen = response.json()
            raw_path, _, query = path.partition("?")
            # the URI exactly as the client sent it: no decoding, no normalisation
            assert (seen["by"], seen["path"], seen["query"]) == (upstream, raw_path, query), path
            headers = seen["headers"]
            assert headers["host"].split(":")[0] == "127.0.0.1"
            assert headers["x-forwarded-for"].endswith("127.0.0.1")
            assert headers["x-forwarded-proto"] == "http"
        # peekproxy's internal surfaces are not routed to it
        for path in ("/_peekproxy/v1/sync", "/metrics", "/health", "/ready"):
            await http.get(path)
    assert not any(
        p.startswith(("/_peekproxy", "/metrics", "/health", "/ready")) for p in peekproxy.seen
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [502, 503, 504])
async def test_sync_and_history_fall_back_when_peekproxy_fails(
    kind: str, status: int, nursery: trio.Nursery, reverse_proxies: StartProxy
) -> None:
    homeserver, peekproxy = Recorder("homeserver"), Recorder("peekproxy")
    failure = {"errcode": "M_UNKNOWN", "error": "peekproxy's own failure"}
    peekproxy.status["/_matrix/client/v3/"] = (status, failure)
    proxy = await reverse_proxies(
        kind, homeserver=await homeserver.serve(nursery), peekproxy=await peekproxy.serve(nursery)
    )
    async with httpx.AsyncClient(base_url=proxy.url) as http:
        synced = await http.get("/_matrix/client/v3/sync?since=s9")
        assert synced.status_code == 200 and synced.json()["by"] == "homeserver"
        assert peekproxy.seen == ["/_matrix/client/v3/sync"]  # tried first, once
        # taken out of the rotation: the next history read goes straight to the homeserver
        history = await http.get("/_matrix/client/v3/rooms/%21r%3Ahs.test/messages")
        assert history.status_code == 200 and history.json()["by"] == "homeserver"
        assert peekproxy.seen == ["/_matrix/client/v3/sync"]
        # the MSC2753 paths have no fallback (the homeserver does not know them): peekproxy's
        # own error passes unchanged
        peeked = await http.post("/_matrix/client/v3/peek/%21r%3Ahs.test", json={})
    assert peeked.status_code == status and peeked.json() == failure


ORIGIN = {"Origin": "https://app.element.io"}
PREFLIGHT = ORIGIN | {
    "Access-Control-Request-Method": "GET",
    "Access-Control-Request-Headers": "authorization",
}


@pytest.mark.parametrize("kind", KINDS)
async def test_browser_clients_get_cors_answers(
    kind: str, nursery: trio.Nursery, reverse_proxies: StartProxy
) -> None:
    """Element Web asks for CORS: preflights (OPTIONS) are answered by the homeserver, which
    answers them on every client path; answers carry exactly one Access-Control-Allow-Origin,
    whichever upstream answered (peekproxy sends none; two would be refused by browsers)."""
    homeserver = Recorder("homeserver", headers={"Access-Control-Allow-Origin": "*"})
    peekproxy = Recorder("peekproxy")
    proxy = await reverse_proxies(
        kind, homeserver=await homeserver.serve(nursery), peekproxy=await peekproxy.serve(nursery)
    )
    async with httpx.AsyncClient(base_url=proxy.url) as http:
        for path in (
            "/_matrix/client/v3/sync",
            "/_matrix/client/v3/peek_room",
            "/_matrix/client/v3/rooms/%21r%3Ahs.test/messages",
        ):
            preflight = await http.options(path, headers=PREFLIGHT)
            assert preflight.json()["by"] == "homeserver", path
            assert preflight.headers.get_list("access-control-allow-origin") == ["*"]
        answers = [
            await http.get("/_matrix/client/v3/sync", headers=ORIGIN),
            await http.post("/_matrix/client/v3/peek_room", headers=ORIGIN, json={}),
        ]
        peekproxy.status["/_matrix/client/v3/sync"] = (503, {"errcode": "M_UNKNOWN"})
        answers.append(await http.get("/_matrix/client/v3/sync", headers=ORIGIN))
    assert [a.json()["by"] for a in answers] == ["peekproxy", "peekproxy", "homeserver"]
    for answer in answers:
        assert answer.headers.get_list("access-control-allow-origin") == ["*"]


@pytest.mark.parametrize("kind", KINDS)
async def test_no_upstream_left_answers_a_matrix_error(
    kind: str, reverse_proxies: StartProxy
) -> None:
    proxy = await reverse_proxies(kind, homeserver=dead_address(), peekproxy=dead_address())
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        answers = {
            "homeserver": await http.get("/_matrix/client/v3/versions"),
            "sync": await http.get("/_matrix/client/v3/sync"),
            "peek": await http.post("/_matrix/client/v3/peek/%21r%3Ahs.test", json={}),
        }
    for what, response in answers.items():
        assert response.status_code == 502, (what, response.text)
        assert response.headers["content-type"].startswith("application/json"), what
        assert response.json()["errcode"] == "M_UNKNOWN", what
    assert "homeserver is unreachable" in answers["sync"].json()["error"]
    assert "peekproxy did not answer" in answers["peek"].json()["error"]


# -- end to end: the real Synapse and peekproxy in front mode -----------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_client_routes_reach_synapse_and_peekproxy(
    kind: str,
    synapse: Synapse,
    fronted: Fronted,
) -> None:
    world = fronted.world
    proxy = await fronted.proxy(kind)
    token = synapse.register(f"routes-{kind}")
    remote_room = world.create_room("10", name="Remote")
    world.send(remote_room, "history on the testbed")
    quoted = quote(remote_room, safe="")  # "!" and ":" percent-encoded
    async with (
        httpx.AsyncClient(base_url=proxy.url, timeout=60) as http,
        httpx.AsyncClient(base_url=synapse.client, timeout=60) as direct,
    ):
        versions = await http.get("/_matrix/client/versions")
        assert versions.status_code == 200 and "v1.1" in versions.json()["versions"]
        login = await http.get("/_matrix/client/v3/login")
        assert {"type": "m.login.password"} in login.json()["flows"]
        created = await client_api(
            proxy.url,
            token,
            "POST",
            "/_matrix/client/v3/createRoom",
            {"name": "Joined", "preset": "private_chat"},
        )
        room_id = created.json()["room_id"]
        sent = await client_api(
            proxy.url,
            token,
            "PUT",
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/send/m.room.message/r1",
            {"msgtype": "m.text", "body": "sent through the proxy"},
        )
        event_id = sent.json()["event_id"]
        seen = await direct.get(
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/event/{quote(event_id)}",
            headers=auth(token),
        )
        assert (
            seen.status_code == 200 and seen.json()["content"]["body"] == "sent through the proxy"
        )
        # MSC2753: reaches peekproxy, which starts a peek of the remote room
        peeked = await http.post(
            f"/_matrix/client/v3/peek/{quoted}",
            params={"server_name": TESTBED},
            json={},
            headers=auth(token),
        )
        assert peeked.status_code == 200, peeked.text
        assert peeked.json() == {"room_id": remote_room}
        assert len(world.log_of("start")) == 1
        # history of the peeked room: answered by peekproxy (Synapse is not in that room)
        history = await http.get(
            f"/_matrix/client/v3/rooms/{quoted}/messages",
            params={"dir": "b"},
            headers=auth(token),
        )
        assert history.status_code == 200, history.text
        assert "history on the testbed" in [
            e["content"].get("body") for e in history.json()["chunk"]
        ]
        unpeeked = await http.post(
            f"/_matrix/client/unstable/org.matrix.msc2753/rooms/{quoted}/unpeek",
            json={},
            headers=auth(token),
        )
        assert unpeeked.status_code == 200 and unpeeked.json() == {}


@pytest.mark.parametrize("kind", KINDS)
async def test_sync_is_answered_by_synapse_when_peekproxy_is_killed(
    kind: str,
    synapse: Synapse,
    fronted: Fronted,
    spawn: Spawn,
) -> None:
    world = fronted.world
    proxy = await fronted.proxy(kind)
    token = synapse.register(f"fallback-{kind}")
    async with (
        httpx.AsyncClient(base_url=proxy.url, timeout=60) as http,
        httpx.AsyncClient(base_url=synapse.client, timeout=60) as direct,
    ):
        room_id = await create_room(synapse, token, name="Fallback")
        first = (await direct.get("/_matrix/client/v3/sync", headers=auth(token))).json()
        world.daemon.signal(signal.SIGKILL)
        await world.daemon.wait()
        answers: list[httpx.Response] = []

        async def long_poll() -> None:
            answers.append(
                await http.get(
                    "/_matrix/client/v3/sync",
                    params={"since": first["next_batch"], "timeout": "20000"},
                    headers=auth(token),
                )
            )

        async with trio.open_nursery() as polls:
            polls.start_soon(long_poll)
            await trio.sleep(0.5)  # the long-poll is waiting at Synapse (nothing happened yet)
            await send_text(synapse, token, room_id, "while peekproxy is down", "f1")
        [answer] = answers
        assert answer.status_code == 200, answer.text
        assert bodies(answer.json()["rooms"]["join"][room_id]) == ["while peekproxy is down"]
        # the token handed out through the proxy is Synapse's own: it works there directly
        later = await direct.get(
            "/_matrix/client/v3/sync",
            params={"since": answer.json()["next_batch"], "timeout": "0"},
            headers=auth(token),
        )
        assert later.status_code == 200
        assert room_id not in later.json().get("rooms", {}).get("join", {})
        # peekproxy back on the same database and address: the peek paths work again at once
        world.daemon = await spawn(world.config, env=world.env)
        remote_room = world.create_room("10")
        peeked = await http.post(
            f"/_matrix/client/v3/peek/{quote(remote_room, safe='')}",
            params={"server_name": TESTBED},
            json={},
            headers=auth(token),
        )
        assert peeked.status_code == 200, peeked.text


async def test_long_polls_are_not_cut_by_either_proxy(
    synapse: Synapse,
    fronted: Fronted,
) -> None:
    """65 s through the proxy and peekproxy's merged /sync: above nginx's default
    proxy_read_timeout (60 s), which the configuration raises; Caddy has no default read
    timeout; peekproxy bounds its own request to Synapse by the client's timeout."""
    world = fronted.world
    token = synapse.register("long-poll")
    async with httpx.AsyncClient(base_url=synapse.client, timeout=30) as direct:
        since = (await direct.get("/_matrix/client/v3/sync", headers=auth(token))).json()[
            "next_batch"
        ]
    results: dict[str, tuple[float, httpx.Response]] = {}

    async def long_poll(kind: str) -> None:
        proxy = await fronted.proxy(kind)
        async with httpx.AsyncClient(base_url=proxy.url, timeout=120) as http:
            started = time.monotonic()
            response = await http.get(
                "/_matrix/client/v3/sync",
                params={"since": since, "timeout": "65000"},
                headers=auth(token),
            )
            results[kind] = (time.monotonic() - started, response)

    async with trio.open_nursery() as polls:
        for kind in KINDS:
            polls.start_soon(long_poll, kind)
    for kind, (elapsed, response) in results.items():
        assert response.status_code == 200, (kind, response.text)
        assert "next_batch" in response.json(), kind
        assert elapsed >= 64, (kind, elapsed)
    # both were answered by peekproxy itself, after the whole long-poll (no fallback)
    await world.daemon.wait_for_log(rb'(?s)(/sync HTTP/1.1" 200 .*){2}', 10)
    answered = re.findall(
        r'"GET /_matrix/client/v3/sync HTTP/1.1" 200 \d+ (\d+\.\d+)s', world.daemon.log
    )
    assert len(answered) == 2 and all(float(s) >= 64 for s in answered), world.daemon.log


# -- Element's SDK (matrix-js-sdk, tests/js) ----------------------------------------------


async def test_js_sdk_through_nginx_with_peekproxy_down_sees_the_same(
    synapse: Synapse, reverse_proxies: StartProxy
) -> None:
    """Element's SDK runs its sync loop for a scripted session twice at once, on two devices
    of one user: directly at Synapse and through nginx with peekproxy down (nginx falls back to
    Synapse). Both see the same rooms and events. With peekproxy up:
    tests/test_reverse_proxies_front.py."""
    node = node_harness()
    token = synapse.register("js-user")
    proxy = await reverse_proxies(
        "nginx", homeserver=address(synapse.client), peekproxy=dead_address()
    )
    async with httpx.AsyncClient(base_url=synapse.client, timeout=60) as direct:
        rooms = [await create_room(synapse, token, name=f"js {n}") for n in range(2)]
        await send_text(synapse, token, rooms[0], "before the clients start", "j1")
        sessions = [
            JsSession(node, synapse.client, await login(direct, "js-user"), "the last one"),
            JsSession(node, proxy.url, await login(direct, "js-user"), "the last one"),
        ]
        async with trio.open_nursery() as clients:
            for session in sessions:
                clients.start_soon(session.run)
            with trio.fail_after(60):
                for session in sessions:
                    await session.prepared.wait()
            await send_text(synapse, token, rooms[1], "live, while they sync", "j2")
            topic = await direct.put(
                f"/_matrix/client/v3/rooms/{quote(rooms[0], safe='')}/state/m.room.topic/",
                headers=auth(token),
                json={"topic": "changed live"},
            )
            assert topic.status_code == 200
            await send_text(synapse, token, rooms[0], "the last one", "j3")
    at_synapse, through_nginx = (session.report for session in sessions)
    assert set(at_synapse["rooms"]) == set(rooms)
    assert through_nginx["rooms"] == at_synapse["rooms"]
    assert through_nginx["errors"] == [] and through_nginx["syncs"] >= 2
    timeline = [e["body"] for e in through_nginx["rooms"][rooms[0]]["events"] if e["body"]]
    assert timeline == ["before the clients start", "the last one"]
    assert through_nginx["peeked"] == at_synapse["peeked"] == {}

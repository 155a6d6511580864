"""No request can break the front (issue 12; docs/front.md): front mode's routes get odd input
from clients and odd answers from the homeserver, over real sockets.

* Clients: ``/sync`` with odd ``since``, ``timeout``, ``full_state``, ``filter`` and tokens;
  history reads with malformed room and event IDs; MSC2753 paths with bodies that are not
  JSON objects; over HTTP/1.1 and h2c. Against the session's real Synapse.
* The homeserver: a tiny server of this module's own on a real socket answers ``whoami``,
  ``/sync`` and ``/messages`` with nonsense (not JSON, arrays, wrong types, 5xx and HTML, a
  truncated body, a hang, a connection reset, a huge body, broken chunking, a deep JSON).
* The HTTP/1.1 and HTTP/2 fuzz of tests/http_fuzz.py against the front-mode client listener.

Each answer is the homeserver's status verbatim or a Matrix error JSON with the right status,
never a 500; afterwards the daemon still serves, and its log holds no traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import quote

import httpx
import trio
import trustme

from tests import http_fuzz
from tests.conftest import Spawn
from tests.front_support import (
    auth,
    client_api,
    create_room,
    front_world,
    peek,
    send_text,
    sync,
)
from tests.odd_homeserver import (
    SPECIAL,
    SYNC_ANSWERS,
    UNAVAILABLE,
    WHOAMI_ANSWERS,
    OddHomeserver,
)
from tests.peek_world import PeekWorld
from tests.synapse import Synapse
from tests.test_http_robustness import Listener, RawH2, Servers, _assert_serving

#: The homeserver request bound the daemon under test is given (``upstream.timeout``), s.
UPSTREAM_TIMEOUT_S = 3.0


def assert_matrix_answer(response: httpx.Response, case: str) -> None:
    """Not a 500; an error status comes with Matrix error JSON."""
    assert response.status_code < 500 or response.status_code in (502, 503, 504), (
        case,
        response.status_code,
        response.text[:300],
    )
    assert response.status_code != 500, (case, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict) and str(body.get("errcode", "")).startswith("M_"), (
            case,
            response.status_code,
            response.text[:300],
        )


def assert_no_traceback(world: PeekWorld) -> None:
    """The daemon runs and logged no traceback (no 500, no fault in its own part)."""
    log = world.daemon.log
    for mark in ("Traceback", "internal error"):
        at = log.find(mark)
        assert at < 0, log[max(0, at - 500) : at + 4000]
    assert world.daemon.process.returncode is None


async def assert_still_serving(world: PeekWorld, token: str | None = None) -> None:
    """``/health`` over HTTP/1.1 and h2c, and (``token``) a ``/sync`` through the front."""
    for http2 in (False, True):
        async with httpx.AsyncClient(http1=not http2, http2=http2, timeout=30) as http:
            health = await http.get(f"{world.daemon.client}/health")
        assert health.status_code == 200, health.text
    if token is not None:
        await sync(world.daemon.client, token)


Request = tuple[str, str, str, dict[str, str], bytes | None]


async def send_cases(world: PeekWorld, cases: list[Request], *, http2: bool) -> None:
    """Each (name, method, path with query, headers, body): a Matrix answer, never a 500."""
    base = world.daemon.client
    async with httpx.AsyncClient(base_url=base, http1=not http2, http2=http2, timeout=60) as http:
        for name, method, path, headers, body in cases:
            response = await http.send(
                http.build_request(
                    method,
                    path,
                    # Header values as latin-1 bytes, as clients may send them.
                    headers={k.encode(): v.encode("latin-1") for k, v in headers.items()},
                    content=body,
                )
            )
            if http2:
                assert response.http_version == "HTTP/2"
            try:
                assert_matrix_answer(response, f"{name} (HTTP/2: {http2})")
            except AssertionError:
                assert_no_traceback(world)  # shows the daemon's traceback
                raise


# -- clients' odd input, against the real Synapse ------------------------------------------


def sync_cases(token: str, since: str) -> list[Request]:
    bearer = auth(token)
    # Past the JSON parser's recursion limit, within the 16 KiB a request's head may take.
    deep = '{"room":' + "[" * 2000 + "]" * 2000 + "}"
    deep_list = '{"room":{"timeline":' + "[" * 2000 + "]" * 2000 + "}}"
    path = "/_matrix/client/v3/sync"

    def get(name: str, query: str, headers: dict[str, str] = bearer) -> Request:
        return (name, "GET", f"{path}?{query}", headers, None)

    return [
        get("since garbage", "since=garbage&timeout=0"),
        get("since long", f"since={'s' * 14_000}&timeout=0"),
        get("since non-UTF-8", "since=%FF%FE%00&timeout=0"),
        get("since empty", "since=&timeout=0"),
        get("since twice", f"since={since}&since=x&timeout=0"),
        get("timeout negative", f"since={since}&timeout=-5"),
        get("timeout huge", "timeout=99999999999999999999999999"),
        get("timeout inf", f"since={since}&timeout=inf"),
        get("timeout 5000 digits", f"since={since}&timeout={'9' * 5000}"),
        get("timeout non-numeric", f"since={since}&timeout=soon"),
        get("timeout float", f"since={since}&timeout=1.5"),
        get("timeout repeated", f"since={since}&timeout=0&timeout=100"),
        get("full_state odd", f"since={since}&full_state=yes&timeout=0"),
        get("full_state empty", f"since={since}&full_state=&timeout=0"),
        get("full_state twice", f"since={since}&full_state=true&full_state=false&timeout=0"),
        get("filter malformed", f"filter={quote('{not json')}&timeout=0"),
        get("filter array", f"filter={quote('[1, 2]')}&timeout=0"),
        get("filter limit odd", "filter=" + quote('{"room":{"timeline":{"limit":"x"}}}')),
        get("filter deeply nested", f"filter={quote(deep, safe='[]')}&timeout=0"),
        get("filter deeply nested list", f"filter={quote(deep_list, safe='[]')}"),
        get("filter ID with /", f"filter={quote('a/b', safe='/')}&timeout=0"),
        get("filter ID ..", "filter=..&timeout=0"),
        get("filter ID %2F", "filter=..%2F..%2Fadmin&timeout=0"),
        get("filter ID %00", "filter=%00&timeout=0"),
        get("filter ID non-UTF-8", "filter=%FF&timeout=0"),
        get("filter huge", f"filter={quote(json.dumps({'x': 'y' * 12_000}))}&timeout=0"),
        get("token in header and query", f"access_token={token}&timeout=0"),
        get(
            "access_token twice",
            f"access_token={token}&access_token={token}&timeout=0",
            {},
        ),
        get("access_token non-ASCII", "access_token=%C3%A9t%C3%A9&timeout=0", {}),
        get("access_token non-UTF-8", "access_token=%FF%FE&timeout=0", {}),
        get("access_token control", "access_token=a%01b%0Ac&timeout=0", {}),
        get("Authorization Basic", "timeout=0", {"Authorization": "Basic dXNlcjpwYXNz"}),
        get("Authorization Bearer alone", "timeout=0", {"Authorization": "Bearer"}),
        get("Authorization Bearer two words", "timeout=0", {"Authorization": "Bearer a b"}),
        get("Authorization latin-1", "timeout=0", {"Authorization": "Bearer caf\xe9"}),
        get("Authorization unknown", "timeout=0", auth("no-such-token")),
        get("X-Forwarded-For latin-1", "timeout=0", bearer | {"X-Forwarded-For": "\xe9\xff"}),
        get("User-Agent latin-1", "timeout=0", bearer | {"User-Agent": "caf\xe9 \xff"}),
        get("X-Forwarded-Proto latin-1", "timeout=0", bearer | {"X-Forwarded-Proto": "h\xe9"}),
        ("POST /sync", "POST", f"{path}?timeout=0", bearer, b"{}"),
        ("HEAD /sync", "HEAD", f"{path}?timeout=0", bearer, None),
        ("OPTIONS /sync, not a preflight", "OPTIONS", path, {"Origin": "https://a.test"}, None),
        *(
            (f"preflight {name}", "OPTIONS", path, {"Origin": "https://a.test"} | asked, None)
            for name, asked in {
                "PATCH": {"Access-Control-Request-Method": "PATCH"},
                "odd method": {"Access-Control-Request-Method": "G\xe9T"},
                "odd header": {
                    "Access-Control-Request-Method": "GET",
                    "Access-Control-Request-Headers": "x-custom, authorization",
                },
                "private network": {
                    "Access-Control-Request-Method": "GET",
                    "Access-Control-Request-Private-Network": "true",
                },
            }.items()
        ),
    ]


def history_cases(token: str, joined: str, peeked: str) -> list[Request]:
    bearer = auth(token)
    rooms = "/_matrix/client/v3/rooms"
    long_room = "!" + "r" * 400 + ":example.org"
    cases: list[Request] = []
    for room in (
        "not-a-room",
        "%21bad",
        "%00",
        "%21a%00%3Ab",
        "%FF%FE",
        quote(long_room, safe=""),
        "!a:b" + "%2F" * 3,
        "..",
        quote(peeked, safe=""),
        quote(joined, safe=""),
    ):
        for tail in ("messages?dir=b", "messages?dir=x&limit=-1&from=%FF", "state"):
            cases.append((f"{room}/{tail}", "GET", f"{rooms}/{room}/{tail}", bearer, None))
        for event in ("$a/b", "$a%2Fb", "..%2F..", "%00", "$" + "e" * 5000, "%FF"):
            cases.append(
                (f"{room}/event/{event}", "GET", f"{rooms}/{room}/event/{event}", bearer, None)
            )
    return cases


def msc2753_cases(token: str, peeked: str) -> list[Request]:
    bearer = auth(token) | {"Content-Type": "application/json"}
    room = quote(peeked, safe="")
    paths = [
        f"/_matrix/client/v3/peek/{room}?server_name=x",
        "/_matrix/client/unstable/org.matrix.msc2753/peek/%21nope%3Aexample.org",
        "/_matrix/client/r0/peek_room",
        f"/_matrix/client/v3/rooms/{room}/unpeek",
        "/_matrix/client/v3/rooms/%00/unpeek",
    ]
    bodies = {
        "not JSON": b"{not json",
        "array": b"[1, 2]",
        "string": b'"x"',
        "null": b"null",
        "non-UTF-8": b'{"a": "\xff\xfe"}',
        "deep": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        "huge": b'{"pad": "' + b"x" * 3_000_000 + b'"}',
        "too large": b'{"pad": "' + b"x" * 9_000_000 + b'"}',
        "empty": b"",
    }
    return [
        (f"POST {path} {name}", "POST", path, bearer, body)
        for path in paths
        for name, body in bodies.items()
    ]


async def test_odd_client_input_on_every_front_route(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    world = await front_world(synapse, nursery, tls_ca, tmp_path, spawn)
    front = world.daemon.client
    token = synapse.register("front-robust")
    joined = await create_room(synapse, token, name="Joined")
    remote = world.create_room("10", name="Remote")
    world.send(remote, "one")
    first = await sync(front, token)
    await peek(world, token, remote)
    # Synapse has news after this token: its incremental answers come at once.
    await send_text(synapse, token, joined, "news", "n1")
    since = first["next_batch"]
    cases = (
        sync_cases(token, since)
        + history_cases(token, joined, remote)
        + msc2753_cases(token, remote)
    )
    for http2 in (False, True):
        await send_cases(world, cases, http2=http2)
        await assert_still_serving(world, token)
    # A timeout past Synapse's timer range: Synapse's own answer (its 500), verbatim.
    huge = f"/_matrix/client/v3/sync?since={since}&timeout={'9' * 30}"
    through = await client_api(front, token, "GET", huge)
    direct = await client_api(synapse.client, token, "GET", huge)
    assert (through.status_code, through.json()) == (direct.status_code, direct.json())
    # A refused preflight: Matrix error JSON, with the CORS headers a browser reads.
    async with httpx.AsyncClient(base_url=front, timeout=30) as http:
        refused = await http.options(
            "/_matrix/client/v3/sync",
            headers={
                "Origin": "https://a.test",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "x-custom",
            },
        )
    assert refused.status_code == 400 and refused.json()["errcode"] == "M_FORBIDDEN"
    assert refused.headers["access-control-allow-origin"] == "*"
    await send_raw_targets(world, token, joined)
    await assert_still_serving(world, token)
    assert_no_traceback(world)
    assert token not in world.daemon.log


#: Request targets as raw bytes (not percent-encoded), for the routes of the front.
RAW_TARGETS = [
    b"/_matrix/client/v3/sync?since=\xff\xfe&timeout=0",
    b'/_matrix/client/v3/sync?filter={"room":\xff}&timeout=0',
    b"/_matrix/client/v3/sync?timeout=0#fragment",
    b"/_matrix/client/v3/sync?timeout=0&timeout",
    b"/_matrix/client/v3/sync?%&timeout=0",
    b"/_matrix/client/v3/rooms/!\xff:x/messages",
    b"/_matrix/client/v3/rooms/\x7f/state",
    b"/_matrix/client/v3/rooms/ROOM/event/$a\xe9b",
    b"/_matrix/client/v3/rooms/ROOM/event/$a#b",
    b"/_matrix/client/v3/rooms/ROOM/event/$a/../../b",
    b"/_matrix/client/v3/rooms/ROOM/messages?from=\xff&dir=b",
    b"/_matrix/client/v3/rooms/ROOM//state",
    b"/_matrix/client/v3//sync",
]


async def send_raw_targets(world: PeekWorld, token: str, room_id: str) -> None:
    """Each of :data:`RAW_TARGETS` over HTTP/1.1 (a raw socket) and HTTP/2 (a raw h2
    connection): an answer that is not a 500, and the connection still works after."""
    host, port = world.daemon.client.split("://", 1)[1].rsplit(":", 1)
    room = quote(room_id, safe="").encode()
    for target in RAW_TARGETS:
        target = target.replace(b"ROOM", room)
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(
                b"GET "
                + target
                + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + token.encode()
                + b"\r\nConnection: close\r\n\r\n"
            )
            answer = b""
            with trio.fail_after(30):
                while data := await stream.receive_some(65536):
                    answer += data
        code = answer.split(b" ", 2)[1] if answer.startswith(b"HTTP/1.1 ") else b""
        assert code and code != b"500", (target, answer[:300])
        if code.startswith((b"4", b"5")) and code not in (b"400", b"431"):  # hypercorn's own
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert body["errcode"].startswith("M_"), (target, answer[:300])
    listener = Listener("front", world.daemon.client, "/health", "GET", "", 0, world.daemon)
    h2 = await RawH2.open(listener, Path("/nonexistent"))
    try:
        for target in RAW_TARGETS:
            path = target.replace(b"ROOM", room).decode("latin-1")
            try:
                status = await h2.get(f"{path}&access_token={token}" if "?" in path else path)
            except AssertionError as e:
                # A path that is not ASCII is malformed: its stream is reset (RFC 9113
                # §8.1.1), the connection goes on.
                assert "reset the stream" in str(e) and not path.isascii(), (target, e)
                status = 0
            assert status != 500, (target, status)
            assert await h2.get("/health") == 200, target
    finally:
        await h2.aclose()


# -- the homeserver's odd answers, from a server of our own --------------------------------


async def test_odd_homeserver_answers_are_passed_on_or_a_502(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    homeserver = OddHomeserver()
    await nursery.start(homeserver.serve)
    world = await front_world(
        None,
        nursery,
        tls_ca,
        tmp_path,
        spawn,
        homeserver_url=homeserver.url,
        env={"PEEKPROXY_UPSTREAM__TIMEOUT": str(UPSTREAM_TIMEOUT_S)},
    )
    front = world.daemon.client
    async with httpx.AsyncClient(base_url=front, timeout=60) as http:
        for case in [*SYNC_ANSWERS, *SPECIAL]:
            for route in (
                "sync?timeout=0&",
                "sync?timeout=100&since=s0&",
                "rooms/!r:hs.test/messages?",
            ):
                started = trio.current_time()
                response = await http.get(
                    f"/_matrix/client/v3/{route}case={case}", headers=auth("good")
                )
                took = trio.current_time() - started
                name = f"{route} {case}"
                if case in (*UNAVAILABLE, *SPECIAL):
                    assert response.status_code == 502, (name, response.text[:300])
                    assert response.json()["errcode"] == "M_UNKNOWN"
                    assert "homeserver" in response.json()["error"], name
                    assert took < UPSTREAM_TIMEOUT_S + 10, (name, took)  # "hang" too
                    continue
                # Anything else: the homeserver's answer, verbatim (its own 500 too).
                raw = SYNC_ANSWERS[case]
                assert response.status_code == int(raw[9:12]), name
                assert response.content == raw.split(b"\r\n\r\n", 1)[1], name
                if case == "content-type-utf8":
                    sent = "application/json; x=€".encode()
                    assert (b"content-type", sent) in response.headers.raw, name
        for case in [*WHOAMI_ANSWERS, *SPECIAL]:
            for route in ("sync?timeout=0", "rooms/!r:hs.test/state"):
                response = await http.get(
                    f"/_matrix/client/v3/{route}", headers=auth(f"whoami-{case}")
                )
                name = f"whoami {case} {route}"
                assert_matrix_answer(response, name)
                assert response.status_code in (401, 403, 502), (name, response.text)
        # A filter ID the homeserver answers oddly: peekproxy's part takes the default
        # timeline limit, the client gets the homeserver's /sync.
        for case in [*WHOAMI_ANSWERS, *SPECIAL]:
            response = await http.get(
                f"/_matrix/client/v3/sync?timeout=0&filter={case}", headers=auth("good")
            )
            assert response.status_code == 200, (case, response.text)
            assert response.json() == {"next_batch": "s1"}
    await assert_still_serving(world)
    assert_no_traceback(world)


# -- the HTTP/1.1 and HTTP/2 fuzz on the front-mode client listener -------------------------


async def test_malformed_traffic_leaves_the_front_listener_serving(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    world = await front_world(synapse, nursery, tls_ca, tmp_path, spawn)
    token = synapse.register("front-fuzz")
    ca = tmp_path / "fuzz-ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca))
    seed = int(os.environ.get("PEEKPROXY_FUZZ_SEED", "2753"))
    # The front's /sync (which reaches Synapse) as the fuzzed requests' path.
    ok_path = f"/_matrix/client/v3/sync?timeout=0&access_token={token}"
    listener = Listener("front client", world.daemon.client, ok_path, "GET", "", 0, world.daemon)
    servers = Servers(world.daemon, world.daemon, [listener], ca)
    host, port = listener.address
    target = http_fuzz.Target(host, port, tls=False, ca=ca, path=ok_path)
    keeper = await RawH2.open(listener, ca)
    try:
        for batch in http_fuzz.batches(seed, target):
            await http_fuzz.send_all(target, batch.cases)
            try:
                await _assert_serving(servers, listener, keeper)
            except AssertionError as e:
                raise AssertionError(f"front after batch {batch.name!r}: {e}") from e
    finally:
        await keeper.aclose()
    await assert_still_serving(world, token)
    assert_no_traceback(world)
    assert token not in world.daemon.log

"""serving/guards.py's GuardedH11Protocol writes an HTTP/1.1 answer with one socket write
(its head with its body) where hypercorn wrote three (issue 17: a fan-out to thousands of
long-polls pays each write); the answers themselves are unchanged."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from peekproxy.serving import install_guards
from tests.support import serve_app

BODY = b'{"next_batch":"s1"}'


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        raise NotImplementedError  # no lifespan: hypercorn goes on without it
    if scope["path"] == "/stream":  # no Content-Length: chunked, two parts
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"one", "more_body": True})
        await send({"type": "http.response.body", "body": b"two"})
        return
    if scope["path"] == "/slow":  # longer than the keep-alive timeout of the test below
        await trio.sleep(1.0)
    if scope["path"] == "/empty":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


async def test_an_answer_is_one_socket_write(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_guards()
    writes: list[bytes] = []
    send_all = trio.SocketStream.send_all

    async def counted(self: trio.SocketStream, data: Any) -> None:
        writes.append(bytes(data))
        await send_all(self, data)

    monkeypatch.setattr(trio.SocketStream, "send_all", counted)
    base = await serve_app(nursery, app)
    async with httpx.AsyncClient(base_url=base) as http:
        writes.clear()
        response = await http.get("/sync")
        server_writes = [w for w in writes if w.startswith(b"HTTP/1.1")]
        assert response.status_code == 200 and response.content == BODY
        # the request is the client's write; the answer is the server's one write
        assert len(server_writes) == 1 and server_writes[0].endswith(BODY), writes
        assert len(writes) == 2, writes

        writes.clear()  # keep-alive: the next request on the same connection
        head = await http.head("/sync")
        assert head.status_code == 200 and head.headers["content-length"] == str(len(BODY))
        assert len(writes) == 2, writes

        empty = await http.get("/empty")
        assert empty.status_code == 204 and empty.content == b""

        stream = await http.get("/stream")  # chunked answers still stream, correctly framed
        assert stream.status_code == 200 and stream.content == b"onetwo"


async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(
    nursery: trio.Nursery,
) -> None:
    install_guards()
    base = await serve_app(nursery, app, keep_alive_timeout=0.3)
    host, port = base.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    request = b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
    started = trio.current_time()
    await stream.send_all(request)
    received = b""
    with trio.fail_after(5):
        while not received.endswith(BODY):  # a request in progress is not cut by the timer
            received += await stream.receive_some(65536)
        assert received.startswith(b"HTTP/1.1 200")
        assert trio.current_time() - started >= 1.0
        idle_from = trio.current_time()
        assert await stream.receive_some(65536) == b""  # then closed once idle
    assert 0.25 <= trio.current_time() - idle_from < 2.0

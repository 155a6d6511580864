"""A homeserver answering nonsense, for tests/test_front_robustness.py: raw bytes on a real
TCP socket, chosen per request by the case the request names (:class:`OddHomeserver`)."""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import trio

from tests.synapse import free_tcp_port

OK_WHOAMI = json.dumps({"user_id": "@u:hs.test", "device_id": "DEV"}).encode()
HUGE = 30_000_000


def http_answer(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 "
        + status.encode()
        + b"\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


SYNC_ANSWERS: dict[str, bytes] = {
    "not-json": http_answer("200 OK", b"hello", b"text/plain"),
    "json-array": http_answer("200 OK", b"[1, 2]"),
    "next-batch-number": http_answer("200 OK", b'{"next_batch": 5}'),
    "next-batch-missing": http_answer("200 OK", b'{"rooms": {}}'),
    "rooms-odd": http_answer("200 OK", b'{"next_batch": "s1", "rooms": {"join": [1]}}'),
    "join-odd": http_answer("200 OK", b'{"next_batch": "s1", "rooms": {"join": {"x": 1}}}'),
    "deep-json": http_answer(
        "200 OK", b'{"next_batch": "s1", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    ),
    "nan": http_answer("200 OK", b'{"next_batch": "s1", "x": NaN}'),
    "500": http_answer("500 Internal Server Error", b'{"errcode": "M_UNKNOWN", "error": "x"}'),
    "502-html": http_answer("502 Bad Gateway", b"<html>bad gateway</html>", b"text/html"),
    "503-empty": http_answer("503 Service Unavailable", b"", b""),
    "content-type-utf8": http_answer(
        "200 OK", b'{"next_batch": "s1"}', "application/json; x=€".encode()
    ),
    "no-content-type": b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n" + b'{"next_batch": "s1"}',
    "truncated": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b'{"next_batch"',
    "bad-chunks": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc",
    "garbage": b"this is not HTTP\r\n\r\n",
    "bad-status": b"HTTP/1.1 2000 Weird\r\nContent-Length: 0\r\n\r\n",
    "bad-gzip": b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\nnotgz",
    "close-at-once": b"",
    "huge": http_answer("200 OK", b'{"next_batch": "s1", "pad": "' + b"x" * HUGE + b'"}'),
}
WHOAMI_ANSWERS: dict[str, bytes] = {
    "not-json": http_answer("200 OK", b"hello", b"text/plain"),
    "json-array": http_answer("200 OK", b"[]"),
    "user-id-number": http_answer("200 OK", b'{"user_id": 5, "device_id": "D"}'),
    "no-device": http_answer("200 OK", b'{"user_id": "@u:hs.test"}'),
    "deep-json": http_answer("200 OK", b"[" * 100_000 + b"]" * 100_000),
    "500-html": http_answer("500 Oops", b"<html>oops</html>", b"text/html"),
    "401-html": http_answer("401 Unauthorized", b"<html>no</html>", b"text/html"),
    "429": http_answer("429 Too Many", b'{"errcode": "M_LIMIT_EXCEEDED", "error": "slow"}'),
    "truncated": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{",
    "garbage": b"this is not HTTP\r\n\r\n",
    "close-at-once": b"",
}
#: The answers that are no whole HTTP answer: the client gets a 502 saying so.
UNAVAILABLE = ("truncated", "bad-chunks", "garbage", "bad-status", "bad-gzip", "close-at-once")
#: Special answers: ``hang`` never answers; ``reset`` resets the connection.
SPECIAL = ("hang", "reset")


class OddHomeserver:
    """A homeserver that answers each request by the case its token or query names: the
    token ``whoami-<case>`` picks the whoami answer (else a valid one), a filter ID the
    answer of the filter read (as whoami's), the query parameter ``case=<case>`` the answer
    to anything else. Raw bytes on a real TCP socket."""

    def __init__(self) -> None:
        self.port = free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[bytes] = []

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                data = await stream.receive_some(65536)
                if not data:
                    return
                head += data
            self.requests.append(head)
            answer = self._answer(head)
            if answer == "hang":
                await trio.sleep_forever()
            if answer == "reset":
                stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                return
            assert isinstance(answer, bytes)
            await stream.send_all(answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    def _answer(self, head: bytes) -> bytes | str:
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        target = line.split(" ")[1] if " " in line else ""
        headers = head.decode("latin-1").lower()
        if "/account/whoami" in target:
            for case, answer in WHOAMI_ANSWERS.items():
                if f"bearer whoami-{case}\r\n" in headers:
                    return answer
            for case in SPECIAL:
                if f"bearer whoami-{case}\r\n" in headers:
                    return case
            return http_answer("200 OK", OK_WHOAMI)
        if "/filter/" in target:  # the filter ID names the case
            case = target.rsplit("/", 1)[1]
            return case if case in SPECIAL else WHOAMI_ANSWERS[case]
        if target.startswith("/_matrix/client/versions"):
            return http_answer("200 OK", b'{"versions": ["v1.11"]}')
        case = target.split("case=", 1)[1].split("&")[0] if "case=" in target else ""
        if case in SPECIAL:
            return case
        return SYNC_ANSWERS.get(case, http_answer("200 OK", b'{"next_batch": "s1"}'))

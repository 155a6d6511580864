"""The floors of bench/fanout.py: servers that answer parked long-polls with a canned body.

Each runs in its own process (``fanout_floors.py KIND PORT``), parks every request until a
``GET /go`` arrives, then answers each parked request with :data:`FLOOR_BODY` (the shape and
size of peekproxy's answer):

- ``trio-h11``: trio + h11 alone, one task per connection, the whole answer in one
  ``send_all``: the lower bound of this machine and this client (no framework, no HTTP
  server library beyond the parser).
- ``bare-hypercorn``: hypercorn (trio worker) serving a bare ASGI app: what any
  hypercorn-served long-poll pays per answer, whatever the application does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from functools import partial
from typing import Any, cast

import h11
import trio
from fanout_client import Poll, fan_out_rounds, long_poll, raise_fd_limit

__all__ = ["FLOORS", "FLOOR_BODY", "floor"]

#: The kinds of floor, as named in the bench's output.
FLOORS = {"trio-h11": "trio-h11 floor", "bare-hypercorn": "bare hypercorn"}

FLOOR_BODY = json.dumps(
    {
        "next_batch": "pp1_2001",
        "rooms": {
            "peek": {
                "!AbCdEfGhIjKlMnOpQr:localhost:40000": {
                    "timeline": {
                        "events": [
                            {
                                "event_id": "$" + "x" * 43,
                                "sender": "@admin:localhost:40000",
                                "type": "m.room.message",
                                "content": {"msgtype": "m.text", "body": "fan out"},
                                "origin_server_ts": 1_700_000_000_000,
                                "unsigned": {"age": 12},
                            }
                        ],
                        "limited": False,
                        "prev_batch": "pp1_2000",
                    },
                    "state": {"events": []},
                    "ephemeral": {"events": []},
                    "account_data": {"events": []},
                    "unread_notifications": {},
                    "summary": {},
                }
            },
            "leave": {},
        },
    },
    separators=(",", ":"),
).encode()  # the shape and size of peekproxy's answer

_HEADERS = [("content-type", "application/json"), ("content-length", str(len(FLOOR_BODY)))]


class _Release:
    """The trigger: every request parked before a ``/go`` waits on the event it saw."""

    def __init__(self) -> None:
        self.event = trio.Event()

    def fire(self) -> None:
        self.event.set()
        self.event = trio.Event()


def serve_trio_h11(port: int) -> None:
    """trio + h11 only: read one request, park it (or fire on ``/go``), answer it with
    headers and body in one ``send_all``, close."""
    release = _Release()

    async def connection(stream: trio.SocketStream) -> None:
        http = h11.Connection(h11.SERVER)
        target = b""
        async with stream:
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    http.receive_data(data)
                elif isinstance(event, h11.Request):
                    target = event.target
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return
            if target == b"/go":
                release.fire()
            else:
                await release.event.wait()
            answer = http.send(h11.Response(status_code=200, headers=_HEADERS))
            answer += http.send(h11.Data(data=FLOOR_BODY)) + http.send(h11.EndOfMessage())
            await stream.send_all(answer)

    trio.run(partial(trio.serve_tcp, connection, port, host="127.0.0.1", backlog=4096))


def serve_bare_hypercorn(port: int) -> None:
    """hypercorn (trio) + a bare ASGI app, access and error logs off."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    release = _Release()
    headers = [(name.encode(), value.encode()) for name, value in _HEADERS]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/go":
            release.fire()
        else:
            await release.event.wait()
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": FLOOR_BODY})

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.backlog = 4096
    trio.run(partial(serve, cast(Any, app), config))


async def floor(kind: str, port: int, devices: int, rounds: int) -> list[float]:
    """Start the floor ``kind`` (a key of :data:`FLOORS`) on ``port`` in its own process,
    park ``devices`` long-polls, fire, ``rounds`` times: every answer's latency after the
    ``/go`` was sent, ms, sorted.

    Raises:
        TimeoutError: the server did not listen within 30 s.
        AssertionError: an answer was not :data:`FLOOR_BODY`.
    """
    process = await trio.lowlevel.open_process(
        [sys.executable, __file__, kind, str(port)], stderr=subprocess.DEVNULL
    )
    try:
        with trio.fail_after(30):
            while True:
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.05)

        async def trigger() -> float:
            fired_at = time.perf_counter()
            await long_poll(port, "/go", [])
            return fired_at

        def follow(poll: Poll, body: bytes) -> Poll:
            assert body == FLOOR_BODY
            return poll

        polls: list[Poll] = [(port, f"/sync?device={d}", []) for d in range(devices)]
        return await fan_out_rounds(polls, rounds, trigger, follow, [process.pid])
    finally:
        process.terminate()
        await process.wait()


if __name__ == "__main__":
    raise_fd_limit()
    {"trio-h11": serve_trio_h11, "bare-hypercorn": serve_bare_hypercorn}[sys.argv[1]](
        int(sys.argv[2])
    )

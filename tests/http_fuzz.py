"""Malformed HTTP/1.1, HTTP/2 and TLS traffic for robustness tests (test_http_robustness.py).

:func:`batches` yields named batches of :class:`Case` (each is one connection: the bytes a
client sends, in chunks). Hand-written cases cover each kind of mistake the listeners must
survive (bad request lines, huge headers, bad chunked encoding, bad Content-Length,
truncated bodies, pipelining garbage; bad HTTP/2 prefaces and frames, oversized header
blocks, RST_STREAM storms, WINDOW_UPDATE abuse, bodies beyond the flow-control window,
bodies without content-length); seeded random mutations of valid requests add the
unforeseen. :func:`send_all` sends a batch, a bounded number of connections at a time, each
bounded in time.
"""

from __future__ import annotations

import random
import ssl
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hpack
import trio

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# HTTP/2 frame types and flags (RFC 9113 §6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, END_HEADERS, PADDED, ACK = 0x1, 0x4, 0x8, 0x1

#: HTTP/1.1 headers asking for h2c (RFC 7540 §3.2) with valid settings (base64url).
UPGRADE_H2C = (
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
)

#: Each connection is given this long (seconds) to be answered or closed.
CASE_TIMEOUT = 0.6
#: Connections open at once.
PARALLEL = 24


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    tls: bool
    ca: Path
    path: str  # a path the listener serves


@dataclass(frozen=True)
class Case:
    name: str
    chunks: tuple[bytes, ...]
    alpn: str = "http/1.1"  # over TLS: the protocol offered ("h2" for HTTP/2 cases)
    raw: bool = False  # over TLS: send the bytes on the TCP socket, no TLS


@dataclass(frozen=True)
class Batch:
    name: str
    cases: list[Case]


def frame(
    kind: int, flags: int, stream_id: int, payload: bytes, length: int | None = None
) -> bytes:
    """One HTTP/2 frame; ``length`` overrides the header's length field (to lie)."""
    size = len(payload) if length is None else length
    return (
        struct.pack(">I", size)[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload
    )


def settings(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def header_block(
    target: Target, method: str = "GET", extra: list[tuple[str, str]] | None = None
) -> bytes:
    headers = [
        (":method", method),
        (":path", target.path),
        (":scheme", "https" if target.tls else "http"),
        (":authority", f"{target.host}:{target.port}"),
    ]
    return _hpack(headers + (extra or []))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def _hpack(headers: list[tuple[str, str]]) -> bytes:
    encoded: bytes = hpack.Encoder().encode(headers)
    return encoded


def _h2(name: str, *chunks: bytes) -> Case:
    return Case(name, (PREFACE + settings(), *chunks), alpn="h2")


def h2_cases(target: Target) -> list[Case]:
    get = header_block(target)
    post = header_block(target, "POST")
    big = "v" * 100_000
    return [
        # Prefaces.
        Case("bad preface", (b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + settings(),), alpn="h2"),
        Case("truncated preface", (PREFACE[:10],), alpn="h2"),
        Case("preface only", (PREFACE,), alpn="h2"),
        Case("preface then DATA on stream 0", (PREFACE + frame(DATA, 0, 0, b"x"),), alpn="h2"),
        # Bad frames.
        _h2("SETTINGS of 5 bytes", frame(SETTINGS, 0, 0, b"\x00" * 5)),
        _h2("SETTINGS on a stream", frame(SETTINGS, 0, 1, b"")),
        _h2("SETTINGS ACK with payload", frame(SETTINGS, ACK, 0, b"\x00" * 6)),
        _h2("PING of 3 bytes", frame(PING, 0, 0, b"abc")),
        _h2("WINDOW_UPDATE of 2 bytes", frame(WINDOW_UPDATE, 0, 0, b"\x00\x01")),
        _h2("HEADERS on stream 0", frame(HEADERS, END_HEADERS | END_STREAM, 0, get)),
        _h2("HEADERS on an even stream", frame(HEADERS, END_HEADERS | END_STREAM, 2, get)),
        _h2("HPACK garbage", frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\xff\xff\xff\xff\x0f")),
        _h2(
            "stream IDs going back",
            frame(HEADERS, END_HEADERS | END_STREAM, 5, get),
            frame(HEADERS, END_HEADERS | END_STREAM, 3, get),
        ),
        _h2("CONTINUATION alone", frame(CONTINUATION, END_HEADERS, 1, get)),
        _h2(
            "HEADERS interrupted by DATA",
            frame(HEADERS, 0, 1, get[:3]),
            frame(DATA, END_STREAM, 1, b"x"),
        ),
        _h2(
            "unknown frame type",
            frame(0xFA, 0xFF, 1, b"junk"),
            frame(HEADERS, END_HEADERS | END_STREAM, 1, get),
        ),
        _h2("frame larger than allowed", frame(DATA, 0, 1, b"x" * 1000, length=2**24 - 1)),
        _h2("PRIORITY on itself", frame(PRIORITY, 0, 1, struct.pack(">IB", 1, 16))),
        _h2(
            "PUSH_PROMISE from a client",
            frame(PUSH_PROMISE, END_HEADERS, 1, struct.pack(">I", 2) + get),
        ),
        _h2("ENABLE_PUSH=2", settings((0x2, 2))),
        _h2("INITIAL_WINDOW_SIZE too big", settings((0x4, 2**31))),
        _h2("MAX_FRAME_SIZE too small", settings((0x5, 1))),
        _h2("RST_STREAM on an idle stream", frame(RST_STREAM, 0, 7, struct.pack(">I", 8))),
        _h2(
            "GOAWAY then HEADERS",
            frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)),
            frame(HEADERS, END_HEADERS | END_STREAM, 1, get),
        ),
        _h2(
            "padding longer than the frame",
            frame(HEADERS, END_HEADERS, 1, post),
            frame(DATA, PADDED | END_STREAM, 1, b"\xff" + b"x" * 10),
        ),
        _h2("DATA on an idle stream", frame(DATA, END_STREAM, 9, b"x" * 100)),
        # Header blocks: oversized, too many, malformed.
        _h2(
            "100 KB header value in CONTINUATIONs",
            *_split_header_block(1, header_block(target, extra=[("x-big", big)])),
        ),
        _h2(
            "5000 headers",
            *_split_header_block(
                1, header_block(target, extra=[(f"x-h{i}", "v") for i in range(5000)])
            ),
        ),
        _h2(
            "HEADERS never ended",
            frame(HEADERS, 0, 1, get),
            *[frame(CONTINUATION, 0, 1, b"\x00") for _ in range(2000)],
        ),
        _h2(
            "no :path",
            frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                _hpack([(":method", "GET"), (":scheme", "http")]),
            ),
        ),
        _h2(
            "no :method",
            frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                _hpack([(":path", "/"), (":scheme", "http")]),
            ),
        ),
        _h2(
            "uppercase header name",
            frame(
                HEADERS, END_HEADERS | END_STREAM, 1, header_block(target, extra=[("X-Up", "1")])
            ),
        ),
        _h2(
            "connection header",
            frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                header_block(target, extra=[("connection", "keep-alive")]),
            ),
        ),
        _h2(
            "CONNECT without authority",
            frame(HEADERS, END_HEADERS, 1, _hpack([(":method", "CONNECT")])),
        ),
        _h2(
            "extended CONNECT websocket",
            frame(
                HEADERS,
                END_HEADERS,
                1,
                header_block(target, "CONNECT", extra=[(":protocol", "websocket")]),
            ),
            frame(DATA, 0, 1, b"\x81\x05hello"),
        ),
        # RST_STREAM storms ("rapid reset") and many streams.
        _h2(
            "rapid reset of 500 streams",
            b"".join(
                frame(HEADERS, END_HEADERS | END_STREAM, sid, get)
                + frame(RST_STREAM, 0, sid, struct.pack(">I", 8))
                for sid in range(1, 1000, 2)
            ),
        ),
        _h2(
            "300 open streams",
            b"".join(frame(HEADERS, END_HEADERS, sid, post) for sid in range(1, 600, 2)),
        ),
        _h2("1000 PINGs", frame(PING, 0, 0, b"12345678") * 1000),
        _h2("1000 SETTINGS", settings((0x3, 10)) * 1000),
        # WINDOW_UPDATE abuse.
        _h2("WINDOW_UPDATE of 0 on the connection", window_update(0, 0)),
        _h2(
            "WINDOW_UPDATE of 0 on a stream",
            frame(HEADERS, END_HEADERS, 1, post),
            window_update(1, 0),
        ),
        _h2("connection window overflow", window_update(0, 2**31 - 1), window_update(0, 2**31 - 1)),
        _h2(
            "stream window overflow",
            frame(HEADERS, END_HEADERS | END_STREAM, 1, get),
            window_update(1, 2**31 - 1),
            window_update(1, 2**31 - 1),
        ),
        _h2("1000 WINDOW_UPDATEs", window_update(0, 1) * 1000),
        # Bodies.
        _h2(
            "body beyond the flow-control window",
            frame(HEADERS, END_HEADERS, 1, post),
            *[frame(DATA, 0, 1, b"x" * 16384) for _ in range(12)],
            frame(DATA, END_STREAM, 1, b""),
        ),
        _h2(
            "body without content-length",
            frame(HEADERS, END_HEADERS, 1, post),
            *[frame(DATA, 0, 1, b"x" * 16000) for _ in range(3)],
            frame(DATA, END_STREAM, 1, b"x"),
        ),
        _h2(
            "body longer than content-length",
            frame(
                HEADERS, END_HEADERS, 1, header_block(target, "POST", [("content-length", "10")])
            ),
            frame(DATA, END_STREAM, 1, b"x" * 1000),
        ),
        _h2(
            "body shorter than content-length",
            frame(
                HEADERS, END_HEADERS, 1, header_block(target, "POST", [("content-length", "1000")])
            ),
            frame(DATA, END_STREAM, 1, b"x"),
        ),
        _h2(
            "body never ended", frame(HEADERS, END_HEADERS, 1, post), frame(DATA, 0, 1, b"x" * 100)
        ),
        _h2(
            "DATA after END_STREAM",
            frame(HEADERS, END_HEADERS | END_STREAM, 1, get),
            frame(DATA, 0, 1, b"x" * 100),
        ),
        _h2(
            "trailers with pseudo-headers",
            frame(HEADERS, END_HEADERS, 1, post),
            frame(DATA, 0, 1, b"x"),
            frame(HEADERS, END_HEADERS | END_STREAM, 1, _hpack([(":path", "/")])),
        ),
    ]


def _split_header_block(stream_id: int, block: bytes, size: int = 16384) -> list[bytes]:
    pieces = [block[i : i + size] for i in range(0, len(block), size)] or [b""]
    frames = [
        frame(HEADERS, END_STREAM | (END_HEADERS if len(pieces) == 1 else 0), stream_id, pieces[0])
    ]
    for i, piece in enumerate(pieces[1:], start=2):
        frames.append(frame(CONTINUATION, END_HEADERS if i == len(pieces) else 0, stream_id, piece))
    return frames


def h1_cases(target: Target) -> list[Case]:
    path = target.path.encode()
    host = f"Host: {target.host}\r\n".encode()
    get = b"GET " + path + b" HTTP/1.1\r\n" + host + b"\r\n"

    def post(headers: bytes, body: bytes) -> bytes:
        return b"POST " + path + b" HTTP/1.1\r\n" + host + headers + b"\r\n" + body

    cases = {
        # Request lines.
        "no target": b"GET\r\n\r\n",
        "HTTP/9.9": b"GET / HTTP/9.9\r\n" + host + b"\r\n",
        "binary garbage": bytes(range(256)) * 4 + b"\r\n\r\n",
        "empty method": b" / HTTP/1.1\r\n" + host + b"\r\n",
        "odd method": b"G@T / HTTP/1.1\r\n" + host + b"\r\n",
        "100 KB target": b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n" + host + b"\r\n",
        "no Host": b"GET " + path + b" HTTP/1.1\r\n\r\n",
        "two Hosts": b"GET " + path + b" HTTP/1.1\r\n" + host + b"Host: other\r\n\r\n",
        "absolute form": b"GET http://elsewhere" + path + b" HTTP/1.1\r\n" + host + b"\r\n",
        "asterisk form": b"OPTIONS * HTTP/1.1\r\n" + host + b"\r\n",
        "CONNECT": b"CONNECT example.org:443 HTTP/1.1\r\n" + host + b"\r\n",
        "LF only": b"GET " + path + b" HTTP/1.1\n" + host.replace(b"\r", b"") + b"\n",
        "bare CR": b"GET " + path + b" HTTP/1.1\r" + host + b"\r\n",
        "HTTP/1.0 keep-alive": b"GET " + path + b" HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        # Headers.
        "header without colon": get[:-2] + b"Bad Header\r\n\r\n",
        "obs-fold": get[:-2] + b"X-A: 1\r\n  folded\r\n\r\n",
        "NUL in a value": get[:-2] + b"X-A: a\x00b\r\n\r\n",
        "space before colon": get[:-2] + b"X-A : 1\r\n\r\n",
        "1000 headers": get[:-2]
        + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 90) for i in range(1000))
        + b"\r\n",
        "200 KB header": get[:-2] + b"X-Big: " + b"v" * 200_000 + b"\r\n\r\n",
        "never-ending headers": get[:-2] + b"X-A: 1\r\n" * 20_000,
        # Chunked bodies.
        "bad chunk size": post(b"Transfer-Encoding: chunked\r\n", b"zz\r\nabc\r\n0\r\n\r\n"),
        "huge chunk size": post(
            b"Transfer-Encoding: chunked\r\n", b"ffffffffffffffffffff\r\nabc\r\n"
        ),
        "negative chunk size": post(b"Transfer-Encoding: chunked\r\n", b"-5\r\nabcde\r\n0\r\n\r\n"),
        "chunk without CRLF": post(b"Transfer-Encoding: chunked\r\n", b"3\r\nabcXYZ0\r\n\r\n"),
        "chunk extension garbage": post(
            b"Transfer-Encoding: chunked\r\n", b"3;\x01\x02=\r\nabc\r\n0\r\n\r\n"
        ),
        "bad trailer": post(b"Transfer-Encoding: chunked\r\n", b"0\r\nno colon\r\n\r\n"),
        "gzip, chunked": post(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"),
        "chunked and Content-Length": post(
            b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            b"0\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        ),
        "unknown Transfer-Encoding": post(b"Transfer-Encoding: bogus\r\n", b"abc"),
        # Content-Length.
        "Content-Length -1": post(b"Content-Length: -1\r\n", b"x"),
        "Content-Length abc": post(b"Content-Length: abc\r\n", b"x"),
        "Content-Length 5, 6": post(b"Content-Length: 5, 6\r\n", b"xxxxxx"),
        "two Content-Lengths": post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"xxxxxx"),
        "Content-Length 10^20": post(b"Content-Length: 100000000000000000000\r\n", b"x" * 1000),
        "GET with a body": b"GET "
        + path
        + b" HTTP/1.1\r\n"
        + host
        + b"Content-Length: 3\r\n\r\nabc",
        # Truncated.
        "truncated body": post(b"Content-Length: 1000\r\n", b"x" * 10),
        "truncated request line": b"GET " + path,
        "truncated headers": get[:-4],
        # Pipelining and protocol switches.
        "50 pipelined GETs": get * 50,
        "GET then garbage": get + b"\x16\x03\x01garbage\r\n\r\n",
        "POST with extra bytes": post(b"Content-Length: 3\r\n", b"abcGARBAGE\r\n\r\n"),
        "GET then HTTP/2 preface": get + PREFACE + settings(),
        "HEAD then GET": b"HEAD " + path + b" HTTP/1.1\r\n" + host + b"\r\n" + get,
        "Expect 100-continue, no body": post(
            b"Expect: 100-continue\r\nContent-Length: 100\r\n", b""
        ),
        "websocket upgrade": get[:-2]
        + b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n\x81\x05hello",
        "h2c upgrade, bad settings": get[:-2]
        + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: !!!\r\n\r\n",
        "h2c upgrade then garbage": get[:-2]
        + UPGRADE_H2C
        + b"\r\n"
        + b"\x00\x00\x05\x00\x00\x00\x00\x00\x01garbage",
        "h2c upgrade with a big body": post(
            UPGRADE_H2C + b"Content-Length: 100000\r\n",
            b"x" * 100_000,
        ),
    }
    return [Case(name, (data,)) for name, data in cases.items()]


def tls_cases() -> list[Case]:
    """Traffic on a TLS port that is not TLS, or broken TLS."""
    hello = bytes.fromhex("160301002e0100002a0303") + b"\x00" * 32 + b"\x00\x00\x02\x00\x2f\x01\x00"
    return [
        Case("plain HTTP on TLS", (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",), raw=True),
        Case("HTTP/2 preface on TLS", (PREFACE + settings(),), raw=True),
        Case("truncated ClientHello", (hello[:20],), raw=True),
        Case("malformed ClientHello", (hello[:5] + b"\xff" * 60,), raw=True),
        Case("random bytes", (random.Random(7).randbytes(5000),), raw=True),
    ]


def mutate(rng: random.Random, data: bytes, rounds: int) -> bytes:
    """``data`` with ``rounds`` random edits: flips, insertions, deletions, repeats, cuts."""
    buf = bytearray(data)
    for _ in range(rounds):
        if not buf:
            buf += rng.randbytes(8)
        at = rng.randrange(len(buf))
        kind = rng.randrange(6)
        if kind == 0:
            buf[at] = rng.randrange(256)
        elif kind == 1:
            buf[at:at] = rng.randbytes(rng.randint(1, 64))
        elif kind == 2:
            del buf[at : at + rng.randint(1, 64)]
        elif kind == 3:
            buf[at:at] = buf[at : at + rng.randint(1, 256)] * rng.randint(2, 50)
        elif kind == 4:
            del buf[at:]
        else:
            buf[at : at + 4] = rng.choice(
                [b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff"]
            )
    return bytes(buf)


def mutated_cases(rng: random.Random, target: Target, count: int) -> tuple[list[Case], list[Case]]:
    """``count`` random mutations each of a valid HTTP/1.1 exchange and a valid HTTP/2 one."""
    path = target.path.encode()
    h1 = (
        b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n2\r\n1}\r\n0\r\n\r\n'
        b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    )
    h2 = (
        PREFACE
        + settings((0x3, 100), (0x4, 65535))
        + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1000))
        + frame(HEADERS, END_HEADERS, 1, header_block(target, "POST", [("content-length", "5")]))
        + frame(DATA, END_STREAM, 1, b'{"a"}')
        + frame(HEADERS, END_HEADERS | END_STREAM, 3, header_block(target))
        + frame(PING, 0, 0, b"abcdefgh")
        + frame(RST_STREAM, 0, 3, struct.pack(">I", 8))
    )
    h1_cases = [
        Case(f"HTTP/1.1 mutation {i}", (mutate(rng, h1, rng.randint(1, 8)),)) for i in range(count)
    ]
    h2_cases = [
        # Mutations past the preface: a broken preface is a case of its own.
        Case(
            f"HTTP/2 mutation {i}",
            (PREFACE + mutate(rng, h2[len(PREFACE) :], rng.randint(1, 8)),),
            alpn="h2",
        )
        for i in range(count)
    ]
    return h1_cases, h2_cases


def batches(seed: int, target: Target, mutations: int = 25) -> Iterator[Batch]:
    """The batches for one listener: HTTP/1.1, HTTP/2 (over TLS with ALPN h2, else h2c by
    prior knowledge), raw TLS garbage (TLS listeners), then the seeded mutations."""
    rng = random.Random(seed)
    yield Batch("HTTP/1.1", h1_cases(target))
    yield Batch("HTTP/2", h2_cases(target))
    if target.tls:
        yield Batch("TLS", tls_cases())
    h1, h2 = mutated_cases(rng, target, mutations)
    yield Batch(f"HTTP/1.1 mutations (seed {seed})", h1)
    yield Batch(f"HTTP/2 mutations (seed {seed})", h2)


async def send_all(target: Target, cases: list[Case]) -> None:
    """Send every case on its own connection, at most :data:`PARALLEL` at once."""
    limiter = trio.CapacityLimiter(PARALLEL)
    async with trio.open_nursery() as nursery:
        for case in cases:
            nursery.start_soon(_send_case, target, case, limiter)


async def _send_case(target: Target, case: Case, limiter: trio.CapacityLimiter) -> None:
    async with limiter:
        stream: trio.abc.Stream | None = None
        with trio.move_on_after(CASE_TIMEOUT):
            try:
                stream = await trio.open_tcp_stream(target.host, target.port)
                if target.tls and not case.raw:
                    context = ssl.create_default_context(cafile=str(target.ca))
                    context.set_alpn_protocols([case.alpn])
                    tls = trio.SSLStream(stream, context, server_hostname="localhost")
                    stream = tls
                    await tls.do_handshake()
                for chunk in case.chunks:
                    await stream.send_all(chunk)
                while await stream.receive_some(65536):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the server closed the connection: fine
        if stream is not None:
            await trio.aclose_forcefully(stream)

"""Guards on hypercorn's trio worker, so that no request can stop a listener.

Every listener (the daemon's federation, client and metrics listeners; the testbed's
federation and admin listeners) is ``hypercorn.trio.serve``. With hypercorn 0.18 two things
together let one request end the whole process:

1. **HTTP/2 data on a stream that is already answered** (hypercorn issue #329, fix
   proposed in PRs #312 and #334, not released). When the application has sent its whole
   response (say a ``401`` before reading the body) the stream leaves
   ``H2Protocol.streams``, but the client may still be sending the request body. Any body
   larger than the 65 535-byte initial flow-control window (RFC 9113 §6.9.2) keeps arriving
   after the answer, and ``H2Protocol._handle_events`` raises ``KeyError`` for its ``DATA``.
   :class:`GuardedH2Protocol` drops such data but still hands its flow-control credit back
   (connection and stream window), so the client finishes sending and reads its answer, and
   other streams on the connection are not starved (RFC 9113 §8.1 lets a server answer
   before the request is complete).
2. **A connection's error ends the server.** The trio worker runs each connection
   (``TCPServer``) in the listener's own nursery, so any exception escaping one connection
   cancels every connection and ends ``serve`` with it. :class:`IsolatedTCPServer` logs
   such an exception on ``peekproxy.http`` (one warning line; the traceback at debug level)
   and closes only that connection. Known to need it with hypercorn 0.18: a WebSocket
   upgrade request followed at once by more bytes (none of our apps serves WebSockets; the
   client gets its ``403``, then hypercorn tries a second response and h11 raises
   ``LocalProtocolError``), found by ``tests/http_fuzz.py``. It also keeps an answer sent
   while the client half-closes from failing inside the application (its docstring).

One access-log line per request (:class:`OneAccessLine`): hypercorn 0.18 logs a request
whose stream closes before its answer is complete (``"GET /x" - -``), and logs it again when
the answer completes. A client that closes its connection as soon as it has read the
answer (curl, a load balancer's health check) races the end of the answer, so most such
requests were logged twice, the first time without a status.

A third guard is about the request after: an HTTP/1.1 answer sent before the request body
has arrived, or during a shutdown, says ``Connection: close`` (:class:`GuardedH11Protocol`),
since hypercorn starts no next request on such a connection and a client that reused it
would lose its next request.

:func:`install_guards` puts the classes where the trio worker looks them up
(``hypercorn.trio.run.TCPServer``, ``hypercorn.protocol.H2Protocol`` and
``hypercorn.protocol.H11Protocol``, and the ``HTTPStream`` these two create). They rely on
hypercorn internals, so ``pyproject.toml`` pins hypercorn to the release line they are
tested against (``tests/test_http_robustness.py``); :func:`install_guards` refuses any other.
"""

from __future__ import annotations

import dataclasses
import logging
from importlib.metadata import version
from time import time
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import h11
import hypercorn.protocol
import hypercorn.protocol.h2
import hypercorn.protocol.h11
import hypercorn.trio.run
import trio
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.events import EndBody, Response, StreamClosed
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.trio.tcp_server import TCPServer

from peekproxy.serving.errors import exception_leaves

__all__ = [
    "TESTED_HYPERCORN",
    "GuardedH2Protocol",
    "GuardedH11Protocol",
    "IsolatedTCPServer",
    "OneAccessLine",
    "QuietProtocolErrors",
    "install_guards",
]

log = logging.getLogger("peekproxy.http")

#: The hypercorn release line whose internals these guards are written and tested against.
TESTED_HYPERCORN = "0.18."


class GuardedH2Protocol(H2Protocol):
    """hypercorn's HTTP/2 protocol, minus the ``KeyError`` on data for an answered stream,
    and minus the end of the whole connection for a request whose ``:method`` or ``:path``
    is not ASCII (hypercorn decodes them as ASCII and the ``UnicodeDecodeError`` ended every
    stream of the connection; found by tests/test_front_robustness.py): such a request is
    malformed, a stream error ``PROTOCOL_ERROR`` (RFC 9113 §8.1.1), so only its stream is
    reset (``RST_STREAM``)."""

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        # One event at a time: an earlier event's await may let the response finish, so
        # whether a stream is still open is only known when its event comes up.
        for event in events:
            if isinstance(event, h2.events.RequestReceived) and not _ascii_request(event):
                self.connection.reset_stream(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
                await self._flush()
                continue
            if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
                # The response is complete; the rest of the body is read and dropped.
                self.connection.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
                await self._flush()
                continue
            await super()._handle_events([event])


class GuardedH11Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol; an answer sent before the request body has arrived,
    or once the server is shutting down, says ``Connection: close``.

    hypercorn cannot start the next request on such a connection. Without the header a
    client may send its next request on it before the close reaches it, and that request
    fails ("server disconnected without sending a response"); RFC 9112 §9.6 asks a server
    that closes to say so. During a shutdown (hypercorn's, or one the server announces first
    with :attr:`~peekproxy.serving.listeners.ListenerConfig.closing`) hypercorn 0.18 also
    left the connection open after the answer, without reading from it: a client that sent
    its next request there (``peekproxy peek``'s next ``/sync`` after the drained one) got
    no answer, and the process waited the whole ``shutdown_grace`` for that connection
    before it exited. With the header the client closes the connection itself once it has
    read the answer (the server closing it could reset the connection before the client
    has read it).
    """

    def _shutting_down(self) -> bool:
        return self.context.terminated.is_set() or getattr(self.config, "closing", False)

    async def stream_send(self, event: StreamEvent) -> None:
        if (
            isinstance(event, Response)
            and event.status_code >= 200
            and (
                self._shutting_down()
                or getattr(self.connection, "their_state", None) is h11.SEND_BODY
            )
            and not any(name.lower() == b"connection" for name, _ in event.headers)
        ):
            event = dataclasses.replace(event, headers=[*event.headers, (b"connection", b"close")])
        await super().stream_send(event)

    #: A final answer's head (status line and headers), written with its first body bytes.
    _head = b""

    async def _send_h11_event(self, event: Any) -> None:
        """hypercorn writes a final answer's head, each body chunk and the end of the
        message with a socket write each; here the head waits for the first body chunk (or
        the message end) and goes out with it, and an empty write (the end of a message
        with a ``Content-Length``) is skipped. One write per answer rather than three: each
        is a pass through trio's scheduler and a system call, and a fan-out to thousands of
        long-polls pays them all (issue 17, bench/fanout.py). Interim (1xx) answers, and
        the answers of a WebSocket upgrade (refused: 403), go out at once as hypercorn's.
        Candidate for upstreaming (hypercorn's ``H11Protocol._send_h11_event``)."""
        try:
            data = self.connection.send(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return
        if isinstance(event, h11.Response) and isinstance(self.stream, HTTPStream):
            self._head = data or b""  # (a WebSocket stream's answers go out as before)
            return
        head, self._head = self._head, b""
        if head or data:
            await self.send(RawData(data=head + (data or b"")))


class OneAccessLine(HTTPStream):
    """hypercorn's HTTP stream, writing exactly one access-log line per request.

    hypercorn writes the line once the answer's end is sent, and a line without status when
    the stream closes before that. A client that closes the connection as soon as it has
    read the answer's body is seen closing before the answer's end is marked sent, so it
    got both lines. Here a stream closed while its answer is under way writes its line (with
    the answer's status) when the answer ends, or when the application returns; a stream
    closed before any answer writes its line (no status) at once, and no second one when
    the application answers after all.
    """

    _line_written = False

    async def handle(self, event: StreamEvent) -> None:
        if isinstance(event, StreamClosed) and not self.closed:
            if self.state in (ASGIHTTPState.RESPONSE, ASGIHTTPState.TRAILERS):
                self.closed = True  # the line comes with the answer's end
                if self.app_put is not None:
                    await self.app_put({"type": "http.disconnect"})
                return
            # hypercorn writes the line of a request closed before its answer
            self._line_written = self._line_written or self.state is not ASGIHTTPState.CLOSED
        await super().handle(event)

    async def app_send(self, message: Any) -> None:
        if message is None and self.closed and self.state is not ASGIHTTPState.REQUEST:
            await self._write_line()  # the client left during the answer
        await super().app_send(message)

    async def _send_closed(self) -> None:
        self.state = ASGIHTTPState.CLOSED
        await self.send(EndBody(stream_id=self.stream_id))
        await self._write_line()
        await self.send(StreamClosed(stream_id=self.stream_id))

    async def _write_line(self) -> None:
        if not self._line_written:
            self._line_written = True
            # hypercorn builds the line's fields before the logger looks at its level: not
            # at all while ``logging.access_log`` is off (live, SIGHUP) — it was ~5% of a
            # fan-out's CPU.
            logger = getattr(self.config.log, "access_logger", None)
            if logger is None or not logger.isEnabledFor(logging.INFO):
                return
            await self.config.log.access(self.scope, self.response, time() - self.start_time)


class IsolatedTCPServer(TCPServer):
    """hypercorn's per-connection handler; an error ends that connection, not the server.

    Also: when the client closes its side (EOF) while an answer is being sent, hypercorn's
    ``_close`` sends EOF without the connection's send lock, and the answer's
    ``send_all`` then raises ``trio.BusyResourceError`` into the application, which
    turned it into a logged 500 (found by tests/http_fuzz.py through the front). The
    connection is closing: :meth:`protocol_send` treats that as closed, as hypercorn
    treats a broken one.
    """

    async def protocol_send(self, event: Event) -> None:
        try:
            await super().protocol_send(event)
        except trio.BusyResourceError:
            await self.protocol.handle(Closed())

    async def run(self) -> None:
        peer = _peer(self.stream)
        try:
            await super().run()
        except* Exception as group:  # Cancelled (a BaseException) still propagates
            # One line: a client can cause the known case at will (module docstring), so no
            # traceback flood.
            log.warning(
                "connection from %s failed and was closed (the listener goes on): %r",
                peer,
                exception_leaves(group)[0],
            )
            log.debug("connection from %s failed", peer, exc_info=group)
            with trio.CancelScope(shield=True):
                await self.stream.aclose()


class QuietProtocolErrors(logging.Filter):
    """On hypercorn's error logger: "Error in ASGI Framework" caused by the client breaking
    the HTTP protocol (h11's ``LocalProtocolError`` / ``RemoteProtocolError``, h2's
    ``ProtocolError``: e.g. the WebSocket upgrade followed at once by more bytes, above)
    becomes one warning line, without the traceback a client could otherwise make us write
    for every such request."""

    _CLIENT_ERRORS = (h11.LocalProtocolError, h11.RemoteProtocolError, h2.exceptions.ProtocolError)

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and record.getMessage() == "Error in ASGI Framework":
            leaf = exception_leaves(error)[0]
            if isinstance(leaf, self._CLIENT_ERRORS):
                record.msg, record.args = "request ended by an HTTP protocol error: %r", (leaf,)
                record.levelno, record.levelname = logging.WARNING, "WARNING"
                record.exc_info, record.exc_text = None, None
        return True


def _ascii_request(event: h2.events.RequestReceived) -> bool:
    """Whether a request's ``:method`` and ``:path`` are ASCII (hypercorn reads them so)."""
    return all(
        bytes(value).isascii()
        for name, value in event.headers or ()
        if bytes(name) in (b":method", b":path")
    )


def _peer(stream: Any) -> str:
    try:
        socket = getattr(stream, "transport_stream", stream).socket
        host, port = socket.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, AttributeError, ValueError, TypeError):
        return "?"


def install_guards() -> None:
    """Make the hypercorn trio worker use :class:`IsolatedTCPServer`,
    :class:`GuardedH2Protocol` and :class:`GuardedH11Protocol` (idempotent; call before
    ``hypercorn.trio.serve``).

    Raises:
        RuntimeError: the installed hypercorn is not the tested release line, or its
            internals are not where the guards expect them.
    """
    installed = version("hypercorn")
    if not installed.startswith(TESTED_HYPERCORN):
        raise RuntimeError(
            f"hypercorn {installed} is installed; peekproxy's listener guards are tested "
            f"with hypercorn {TESTED_HYPERCORN}x only (see peekproxy/serving/guards.py)"
        )
    worker, protocols = vars(hypercorn.trio.run), vars(hypercorn.protocol)
    streams = (vars(hypercorn.protocol.h2), vars(hypercorn.protocol.h11))
    if (
        worker.get("TCPServer") not in (TCPServer, IsolatedTCPServer)
        or protocols.get("H2Protocol") not in (H2Protocol, GuardedH2Protocol)
        or protocols.get("H11Protocol") not in (H11Protocol, GuardedH11Protocol)
        or any(module.get("HTTPStream") not in (HTTPStream, OneAccessLine) for module in streams)
        or not callable(getattr(HTTPStream, "_send_closed", None))
    ):
        raise RuntimeError("hypercorn internals changed: cannot install the listener guards")
    if not any(isinstance(f, QuietProtocolErrors) for f in log.filters):
        log.addFilter(QuietProtocolErrors())
    worker["TCPServer"] = IsolatedTCPServer
    protocols["H2Protocol"] = GuardedH2Protocol
    protocols["H11Protocol"] = GuardedH11Protocol
    for module in streams:
        module["HTTPStream"] = OneAccessLine

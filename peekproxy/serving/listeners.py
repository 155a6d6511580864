"""Listeners: hypercorn's trio worker for one ASGI app each, started in a nursery.

The daemon (federation, client and metrics listeners) and the testbed (federation and admin
listeners) start every listener here, so each one gets the same hypercorn settings, the
guards of :mod:`peekproxy.serving.guards`, the same ``cannot listen on ...`` error and the
same graceful drain.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.types import ASGIApp

from peekproxy.logs import ACCESS_LOG_FORMAT
from peekproxy.serving.errors import ServingError, exception_leaves
from peekproxy.serving.guards import install_guards

__all__ = [
    "LISTEN_BACKLOG",
    "ListenerConfig",
    "Listeners",
    "hypercorn_config",
    "open_listeners",
    "start_listener",
]

#: Pending connections each listener queues (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 4096


class ListenerConfig(HypercornConfig):
    """hypercorn's settings for one listener, whose TLS certificate can be replaced while it
    serves (:meth:`reload_certificate`).

    hypercorn builds its ``SSLContext`` once, when the listener starts; this config builds
    it on the first call and hands the same context out after, so loading a new pair into
    it changes what every later handshake presents. Connections already open keep theirs.
    """

    _ssl_context: ssl.SSLContext | None = None
    #: Set when the server starts its shutdown, before it answers its open long-polls: from
    #: then on every HTTP/1.1 answer says ``Connection: close``
    #: (:class:`~peekproxy.serving.guards.GuardedH11Protocol`), so the client closes that
    #: connection rather than send another request the shutdown would leave unanswered.
    closing: bool = False

    def create_ssl_context(self) -> ssl.SSLContext | None:
        if self._ssl_context is None:
            self._ssl_context = super().create_ssl_context()
        return self._ssl_context

    def reload_certificate(self, certfile: Path, keyfile: Path) -> None:
        """Serve the PEM chain ``certfile`` with the key ``keyfile`` to new connections.

        The pair is loaded into a scratch context first, so a pair that does not load (or
        does not match) leaves the one in force untouched.

        Raises:
            ssl.SSLError / OSError: the files cannot be read, are not PEM, or do not match.
            ValueError: this listener does not speak TLS (turning TLS on or off needs a
                restart).
        """
        context = self.create_ssl_context()
        if context is None:
            raise ValueError("this listener does not use TLS")
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
        context.load_cert_chain(certfile, keyfile)
        self.certfile, self.keyfile = str(certfile), str(keyfile)


def hypercorn_config(
    bind: str,
    *,
    grace: float,
    access_log: bool,
    certfile: Path | None = None,
    keyfile: Path | None = None,
) -> ListenerConfig:
    """hypercorn's settings for one listener.

    ``bind`` is ``host:port`` (port ``0``: any free port); ``grace`` is the graceful drain
    in seconds (hypercorn's ``graceful_timeout``: how long in-flight requests may run on
    after shutdown); ``access_log`` writes one ``peekproxy.access`` line per request
    (:data:`~peekproxy.logs.ACCESS_LOG_FORMAT`); hypercorn's own errors go to
    ``peekproxy.http``. With both ``certfile`` and ``keyfile`` (PEM chain and key) the
    listener speaks TLS, offering HTTP/2 and HTTP/1.1 by ALPN; without, plain HTTP/1.1 and
    h2c. The backlog is :data:`LISTEN_BACKLOG`; no ``Server`` header is sent. The
    certificate can be replaced later (:meth:`ListenerConfig.reload_certificate`), and
    ``graceful_timeout`` changed until the listener stops.
    """
    config = ListenerConfig()
    config.bind = [bind]
    # hypercorn's default of 100 pending connections drops SYNs when many devices (re)connect
    # at once, e.g. after a restart; each dropped SYN costs that client 1 s, then 3 s.
    config.backlog = LISTEN_BACKLOG
    config.graceful_timeout = grace
    config.accesslog = logging.getLogger("peekproxy.access") if access_log else None
    config.access_log_format = ACCESS_LOG_FORMAT
    config.errorlog = logging.getLogger("peekproxy.http")
    config.include_server_header = False
    if certfile is not None and keyfile is not None:
        config.certfile = str(certfile)
        config.keyfile = str(keyfile)
    return config


async def start_listener(
    nursery: trio.Nursery,
    key: str,
    app: ASGIApp,
    config: HypercornConfig,
    shutdown: trio.Event,
) -> str:
    """Serve ``app`` with ``config`` (:func:`hypercorn_config`) in ``nursery``; returns once
    the socket is bound, with the base URL it listens on (``http://127.0.0.1:8008``,
    ``https://...`` with TLS; the real port when the bind asked for port 0).

    The guards are installed first (:func:`~peekproxy.serving.guards.install_guards`), so
    no request can end the listener or the process. Once ``shutdown`` is set the listener
    stops accepting connections, gives in-flight requests ``config.graceful_timeout``
    seconds, and its task in ``nursery`` ends.

    Raises:
        ServingError: ``<key>: cannot listen on <bind>: <reason>`` when the socket cannot be
            bound (``key`` is the config key of the bind address, e.g.
            ``listeners.client.bind``).
        RuntimeError: the guards cannot be installed (an untested hypercorn).
    """
    install_guards()
    framework: Any = app  # hypercorn's own ASGI type aliases are narrower than Starlette's
    try:
        binds: list[str] = await nursery.start(
            partial(serve, framework, config, shutdown_trigger=shutdown.wait)
        )
    except* OSError as group:
        first = exception_leaves(group)[0]
        reason = first.strerror if isinstance(first, OSError) and first.strerror else str(first)
        raise ServingError(f"{key}: cannot listen on {config.bind[0]}: {reason}") from None
    return binds[0]


class Listeners:
    """The listeners of one server, all stopped by one ``shutdown`` event
    (:func:`open_listeners`)."""

    def __init__(self, nursery: trio.Nursery, shutdown: trio.Event) -> None:
        self._nursery = nursery
        self._shutdown = shutdown

    async def start(self, key: str, app: ASGIApp, config: HypercornConfig) -> str:
        """:func:`start_listener` in this group: the bound base URL.

        Raises:
            ServingError: the socket cannot be bound (the message names ``key``).
        """
        return await start_listener(self._nursery, key, app, config, self._shutdown)


@asynccontextmanager
async def open_listeners(shutdown: trio.Event) -> AsyncIterator[Listeners]:
    """A group of listeners in their own nursery; leaving the block is the graceful drain.

    The block ends once ``shutdown`` is set and every listener has drained: stopped
    accepting, and its in-flight requests finished or their ``graceful_timeout`` passed.
    An exception in the block or in a listener cancels them all at once.
    """
    async with trio.open_nursery() as nursery:
        yield Listeners(nursery, shutdown)

"""The daemon: opens the store, loads the signing key and serves the listeners.

Everything runs in one trio nursery owned by :func:`run_daemon`. Each listener is a
hypercorn trio worker started with ``nursery.start``, so readiness is known: the
``ready`` log line and ``READY=1`` (systemd) come only once every listener is bound.
SIGINT/SIGTERM stop accepting connections and give in-flight requests
``server.shutdown_grace`` seconds to finish; a second signal stops at once.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.types import ASGIApp, Receive, Scope, Send

from peekproxy import __version__, gc_policy, http_guard
from peekproxy.api.client import client_app
from peekproxy.api.delegation import SecretFileError, delegation_routes, read_secret
from peekproxy.api.errors import matrix_error_response
from peekproxy.api.federation import federation_app
from peekproxy.api.upstream_auth import UpstreamAuth
from peekproxy.config import Config
from peekproxy.federation.client import FederationClient
from peekproxy.federation.keyring import Keyring, TrustedNotary
from peekproxy.federation.signing_key import key_id, load_signing_key
from peekproxy.logs import ACCESS_LOG_FORMAT
from peekproxy.metrics import metrics_app
from peekproxy.peeks.service import PeekService, PeekSettings
from peekproxy.sdnotify import sd_notify
from peekproxy.store import open_sqlite

__all__ = ["DaemonError", "Listening", "run_daemon"]

log = logging.getLogger("peekproxy")

#: MSC2753 client endpoints are served on all three (protocol.md decision 5).
CLIENT_PREFIXES = (
    "/_matrix/client/r0",
    "/_matrix/client/v3",
    "/_matrix/client/unstable/org.matrix.msc2753",
)


class DaemonError(Exception):
    """The daemon cannot start (e.g. a listener cannot bind); the message names the key."""


@dataclass(frozen=True)
class Listening:
    """Base URLs of the bound listeners (``http://host:port`` or ``https://...``)."""

    client: str
    federation: str
    metrics: str | None


class _MetricsOnly:
    """Serves ``GET /metrics``; everything else is ``404 M_UNRECOGNIZED``."""

    def __init__(self) -> None:
        self._metrics = metrics_app()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] == "http" and scope["path"] == "/metrics":
            if scope["method"] in ("GET", "HEAD"):
                await self._metrics(scope, receive, send)
                return
            response = matrix_error_response(405, "M_UNRECOGNIZED", "Unrecognized request")
            await response(scope, receive, send)
            return
        response = matrix_error_response(404, "M_UNRECOGNIZED", "Unrecognized request")
        await response(scope, receive, send)


#: Pending connections each listener queues (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 4096


def _hypercorn_config(
    bind: str,
    *,
    grace: float,
    access_log: bool,
    certfile: Path | None = None,
    keyfile: Path | None = None,
) -> HypercornConfig:
    config = HypercornConfig()
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


async def _start_listener(
    nursery: trio.Nursery,
    key: str,
    app: ASGIApp,
    config: HypercornConfig,
    shutdown: trio.Event,
) -> str:
    # No request may end the process or other connections (peekproxy/http_guard.py).
    http_guard.install()
    framework: Any = app  # hypercorn's own ASGI type aliases are narrower than Starlette's
    try:
        binds: list[str] = await nursery.start(
            partial(serve, framework, config, shutdown_trigger=shutdown.wait)
        )
    except* OSError as group:
        first = _leaves(group)[0]
        reason = first.strerror if isinstance(first, OSError) and first.strerror else str(first)
        raise DaemonError(f"{key}: cannot listen on {config.bind[0]}: {reason}") from None
    return binds[0]


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


async def _watch_signals(shutdown: trio.Event, cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if shutdown.is_set():
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                cancel_scope.cancel()
                return
            log.info("%s received: shutting down", signal.Signals(signum).name)
            shutdown.set()


async def run_daemon(
    config: Config,
    *,
    shutdown: trio.Event | None = None,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run peekproxy until ``shutdown`` is set (or SIGINT/SIGTERM when ``handle_signals``).

    Calls ``task_status.started(Listening(...))`` once every listener is bound.

    Raises:
        SigningKeyError: the signing key cannot be loaded.
        StoreError: the database cannot be used (StoreVersionError: it is too new).
        DaemonError: the delegation secret file cannot be read or is empty; a listener
            cannot bind (inside an ExceptionGroup).
    """
    if shutdown is None:
        shutdown = trio.Event()
    server = config.server
    signing_key = load_signing_key(server.signing_key_file)
    try:
        secret = read_secret(config.delegation.shared_secret_file)
    except SecretFileError as e:  # check-config passed, but the file changed since
        raise DaemonError(f"delegation.shared_secret_file: {e}") from None
    # The database is bound to the server name only once the daemon has started (below):
    # a start that fails must not leave a database that a corrected config is refused by.
    store = await open_sqlite(config.sqlite_path, server.server_name, record_server_name=False)
    federation = FederationClient.from_config(
        config.federation, server_name=server.server_name, signing_key=signing_key
    )
    keyring = Keyring(
        federation,
        store,
        [
            TrustedNotary(n.server_name, n.verify_keys)
            for n in config.federation.trusted_key_servers
        ],
    )
    await keyring.load()
    peeks = PeekService(
        store=store,
        client=federation,
        keyring=keyring,
        settings=PeekSettings(
            linger_ms=int(config.peeks.linger * 1000),
            renewal_max_ms=int(config.peeks.renewal_interval_max * 1000),
            max_peeks_per_device=config.peeks.max_peeks_per_device,
            max_remote_peeks=config.peeks.max_remote_peeks,
            idle_timeout_ms=int(config.peeks.idle_timeout * 1000),
            sync_section=config.peeks.sync_section,
        ),
    )
    limits = {
        "rate_limit_per_second": config.peeks.rate_limit_per_second,
        "rate_limit_burst": config.peeks.rate_limit_burst,
    }
    client_routes = delegation_routes(peeks, secret, **limits)  # type: ignore[arg-type]
    upstream = None
    if config.upstream.homeserver_url:
        # Front mode: the MSC2753 client endpoints, with the homeserver's access tokens.
        upstream = UpstreamAuth(config.upstream.homeserver_url)
        client_routes += delegation_routes(
            peeks,
            None,
            auth=upstream,
            prefixes=CLIENT_PREFIXES,
            with_sync=False,
            **limits,  # type: ignore[arg-type]
        )
    started = False
    gc_thresholds: tuple[int, int, int] | None = None
    grace = server.shutdown_grace
    access_log = config.logging.access_log
    listeners = config.listeners
    try:
        async with trio.open_nursery() as outer:
            if handle_signals:
                outer.start_soon(_watch_signals, shutdown, outer.cancel_scope)
            await outer.start(peeks.run)
            async with trio.open_nursery() as servers:
                federation_url = await _start_listener(
                    servers,
                    "listeners.federation.bind",
                    federation_app(
                        server_name=server.server_name,
                        signing_key=signing_key,
                        key_valid_for_ms=int(server.key_valid_for * 1000),
                        old_verify_keys={
                            kid: (old.key, old.expired_ts)
                            for kid, old in server.old_verify_keys.items()
                        },
                        keyring=keyring,
                        peeks=peeks,
                    ),
                    _hypercorn_config(
                        listeners.federation.bind,
                        grace=grace,
                        access_log=access_log,
                        certfile=listeners.federation.tls_certificate_file,
                        keyfile=listeners.federation.tls_private_key_file,
                    ),
                    shutdown,
                )
                client_url = await _start_listener(
                    servers,
                    "listeners.client.bind",
                    client_app(store=store, routes=client_routes),
                    _hypercorn_config(listeners.client.bind, grace=grace, access_log=access_log),
                    shutdown,
                )
                metrics_url = None
                if listeners.metrics.enabled:
                    metrics_url = await _start_listener(
                        servers,
                        "listeners.metrics.bind",
                        _MetricsOnly(),
                        _hypercorn_config(listeners.metrics.bind, grace=grace, access_log=False),
                        shutdown,
                    )
                listening = Listening(client_url, federation_url, metrics_url)
                await store.record_server_name()
                log.info(
                    "peekproxy %s ready: server_name=%s key=%s client=%s federation=%s "
                    "key_server=%s/_matrix/key/v2/server metrics=%s",
                    __version__,
                    server.server_name,
                    key_id(signing_key),
                    client_url,
                    federation_url,
                    federation_url,
                    f"{metrics_url}/metrics" if metrics_url else "disabled",
                )
                sd_notify("READY=1")
                started = True
                gc_thresholds = gc_policy.settle()
                outer.start_soon(gc_policy.collect_periodically)
                task_status.started(listening)
                await shutdown.wait()
                sd_notify("STOPPING=1")
            outer.cancel_scope.cancel()
    finally:
        if gc_thresholds is not None:
            gc_policy.restore(gc_thresholds)
        with trio.CancelScope(shield=True):
            if upstream is not None:
                await upstream.aclose()
            await federation.aclose()
            await store.aclose()
        if started:
            log.info("peekproxy stopped")

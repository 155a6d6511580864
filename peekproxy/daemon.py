"""The daemon (``peekproxy run``): assembly only.

:func:`run_daemon` turns the config into the parts and serves them: signing key and
delegation secret, the store, the federation client and keyring, the services, then the
apps of the federation, client and (optional) metrics listeners, served with
:mod:`peekproxy.serving` (hypercorn settings, listener guards, signals, graceful drain).
Everything runs in one trio nursery. The ``ready`` log line and ``READY=1`` (systemd) come
only once every listener accepts connections. SIGINT/SIGTERM: ``STOPPING=1``, every open
``/sync`` long-poll is answered at once (:meth:`Notifier.drain`), the listeners stop
accepting connections and give other in-flight requests ``server.shutdown_grace`` seconds
to finish; a second signal stops at once. SIGHUP reloads the config
(:class:`peekproxy.reload.Reloader`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio
from starlette.routing import BaseRoute

from peekproxy import __version__, gc_policy
from peekproxy.api.client import client_app
from peekproxy.api.delegation import DelegationApi, delegation_routes
from peekproxy.api.delegation_params import SecretFileError, read_secret
from peekproxy.api.federation import federation_app
from peekproxy.api.front import FrontApi
from peekproxy.api.metrics import MetricsOnly
from peekproxy.api.upstream_auth import UpstreamAuth
from peekproxy.config import Config
from peekproxy.federation.client import FederationClient
from peekproxy.federation.keyring import Keyring, TrustedNotary
from peekproxy.federation.signing_key import key_id, load_signing_key
from peekproxy.homeserver.client import HomeserverClient
from peekproxy.reload import LoadConfig, Reloader, live_settings
from peekproxy.sdnotify import sd_notify
from peekproxy.services.assembly import PeekSettings, Services, build_services
from peekproxy.services.client_api_follower import ClientApiFollower
from peekproxy.services.front_sync import FrontSync
from peekproxy.services.gauges import ScrapeGauges
from peekproxy.services.passthrough import Passthrough
from peekproxy.services.settings import ObserverSettings, cluster_settings
from peekproxy.serving import ServingError, hypercorn_config, open_listeners, watch_signals
from peekproxy.store import Storage, StoreError
from peekproxy.store.postgres import open_postgres
from peekproxy.store.sqlite import open_sqlite

__all__ = ["Listening", "client_api_routes", "run_daemon"]

log = logging.getLogger("peekproxy")

#: MSC2753 client endpoints are served on all three (protocol.md decision 5).
CLIENT_PREFIXES = (
    "/_matrix/client/r0",
    "/_matrix/client/v3",
    "/_matrix/client/unstable/org.matrix.msc2753",
)


def _front_mode(config: Config) -> str:
    """The ready line's ``front=``: ``off``, or the homeserver and whether its own rooms are
    read (``upstream.access_token_file``)."""
    upstream = config.upstream
    if not upstream.homeserver_url:
        return "off"
    local = "with" if upstream.access_token_file else "without"
    return f"{upstream.homeserver_url} ({local} its own rooms)"


@dataclass(frozen=True)
class Listening:
    """Base URLs of the bound listeners (``http://host:port`` or ``https://...``)."""

    client: str
    federation: str
    metrics: str | None


def _read_secret(path: Path | None, key: str) -> str | None:
    try:
        return read_secret(path)
    except SecretFileError as e:  # check-config passed, but the file changed since
        raise ServingError(f"{key}: {e}") from None


def client_api_routes(
    services: Services, store: Storage, homeserver: HomeserverClient | None, config: Config
) -> tuple[list[BaseRoute], Callable[[], Awaitable[str | None]] | None]:
    """The client listener's routes besides ``/health`` and ``/ready``, and front mode's
    readiness check of the homeserver (``None`` outside front mode): the delegation API
    (``/_peekproxy/v1``, with the admin API), and in front mode (``homeserver`` given,
    docs/front.md) the merged ``/sync``, the history reads routed by peek and the MSC2753
    client endpoints, all with the homeserver's access tokens. docs/operations.md
    ("Endpoints") lists them all."""
    routes: list[BaseRoute] = [*delegation_routes(services)]
    if homeserver is None:
        return routes, None
    passthrough = Passthrough(homeserver)
    auth = UpstreamAuth(homeserver)
    msc2753 = DelegationApi(
        services.syncing, services.reads, live=services.settings.live, auth=auth
    )
    front = FrontSync(
        passthrough=passthrough,
        syncing=services.syncing,
        store=store,
        section=config.peeks.sync_section,
    )
    api = FrontApi(auth=auth, front=front, passthrough=passthrough, delegation=msc2753)
    routes += api.routes()  # before the MSC2753 routes: the first match wins
    routes += msc2753.routes(CLIENT_PREFIXES, with_sync=False)
    return routes, passthrough.homeserver_answers


async def _release_leases(services: Services) -> None:
    """On a clean stop, give this instance's room leases up so the other instances of a
    cluster take the rooms over at their next look (docs/cluster.md); at most 2 s, and a
    store that cannot be reached only costs the others a lease's wait."""
    leases = services.subscriptions.leases
    if leases is None:
        return
    with trio.move_on_after(2.0):
        try:
            released = await leases.release_all()
        except StoreError as e:
            log.warning(
                "could not release the room leases at stop (%s): other instances "
                "take the rooms over once the leases run out",
                e,
            )
            return
        if released:
            log.info("released the leases of %d room(s) to the other instances", released)


async def open_store(config: Config) -> Storage:
    """The configured store (``[store] backend``), its server name not yet recorded (the
    daemon records it once started). SQLite: this process alone; PostgreSQL: shared by the
    instances of one server name (docs/postgresql.md).

    Raises:
        ServingError: ``store.password_file`` cannot be read or its first line is empty.
        StoreError: as :func:`~peekproxy.store.sqlite.open_sqlite` /
            :func:`~peekproxy.store.postgres.open_postgres`.
    """
    name = config.server.server_name
    if config.store.backend == "postgres":
        assert config.store.dsn is not None  # the config's validator
        return await open_postgres(
            config.store.dsn,
            name,
            password=_read_secret(config.store.password_file, "store.password_file"),
            pool_size=config.store.pool_size,
            record_server_name=False,
        )
    return await open_sqlite(config.sqlite_path, name, record_server_name=False)


async def run_daemon(
    config: Config,
    *,
    shutdown: trio.Event | None = None,
    handle_signals: bool = True,
    reload: LoadConfig | None = None,
    task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run peekproxy until ``shutdown`` is set (or SIGINT/SIGTERM when ``handle_signals``).

    Calls ``task_status.started(Listening(...))`` once every listener is bound.
    ``reload`` reads the config file again (a new Config, or ConfigError): SIGHUP runs it
    and applies the live settings (:class:`~peekproxy.reload.Reloader`); without it a
    SIGHUP is logged and ignored.

    Raises:
        SigningKeyError: the signing key cannot be loaded.
        StoreError: the database cannot be used (StoreVersionError: it is too new).
        ServingError: the delegation secret file (or ``upstream.access_token_file``) cannot
            be read or is empty; a listener cannot bind (inside an ExceptionGroup).
    """
    if shutdown is None:
        shutdown = trio.Event()
    server = config.server
    signing_key = load_signing_key(server.signing_key_file)
    secret = _read_secret(config.delegation.shared_secret_file, "delegation.shared_secret_file")
    upstream_token = _read_secret(config.upstream.access_token_file, "upstream.access_token_file")
    # The database is bound to the server name only once the daemon has started (below):
    # a start that fails must not leave a database that a corrected config is refused by.
    store = await open_store(config)
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
    homeserver = local_rooms = None
    if config.upstream.homeserver_url:
        # Front mode: the one client of the fronted homeserver's client API.
        homeserver = HomeserverClient(
            config.upstream.homeserver_url, timeout_s=config.upstream.timeout
        )
        if upstream_token:
            # World_readable rooms of the homeserver itself, through its client API.
            local_rooms = ClientApiFollower(homeserver=homeserver, token=upstream_token)
    live = live_settings(config, secret)
    services = build_services(
        store=store,
        client=federation,
        keyring=keyring,
        settings=PeekSettings(
            linger_ms=int(config.peeks.linger * 1000),
            renewal_max_ms=int(config.peeks.renewal_interval_max * 1000),
            live=live,
            idle_timeout_ms=int(config.peeks.idle_timeout * 1000),
            sync_section=config.peeks.sync_section,
            observer=ObserverSettings(
                user_id=f"@{config.peeks.observer_localpart}:{config.server.server_name}",
                joins=config.peeks.fallback == "observer_join",
                displayname=config.peeks.observer_displayname,
                linger_ms=int(config.peeks.observer_linger * 1000),
            ),
            cluster=None
            if not config.cluster_enabled
            else cluster_settings(config.cluster.instance_name, config.cluster.lease),
        ),
        local_rooms=local_rooms,
        server_name=server.server_name,
        signing_key=signing_key,
    )

    client_routes, homeserver_check = client_api_routes(services, store, homeserver, config)
    started = False
    gc_thresholds: tuple[int, int, int] | None = None
    grace = server.shutdown_grace
    listeners = config.listeners
    # The access log is switched by its logger (a reload may turn it on or off).
    logging.getLogger("peekproxy.access").disabled = not config.logging.access_log
    federation_http = hypercorn_config(
        listeners.federation.bind,
        grace=grace,
        access_log=True,
        certfile=listeners.federation.tls_certificate_file,
        keyfile=listeners.federation.tls_private_key_file,
    )
    client_http = hypercorn_config(listeners.client.bind, grace=grace, access_log=True)
    metrics_http = hypercorn_config(listeners.metrics.bind, grace=grace, access_log=False)
    reloader = None
    if reload is not None:
        reloader = Reloader(
            config,
            reload,
            live,
            listeners=(federation_http, client_http, metrics_http),
            federation=federation_http,
        )
    try:
        async with trio.open_nursery() as outer:
            if handle_signals:
                outer.start_soon(
                    watch_signals,
                    shutdown,
                    outer.cancel_scope,
                    None if reloader is None else reloader.reload,
                )
            await outer.start(services.run)
            async with open_listeners(shutdown) as servers:
                federation_url = await servers.start(
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
                        ingest=services.ingest,
                        members=services.members,
                        observer=services.observer_queries,
                    ),
                    federation_http,
                )
                client_url = await servers.start(
                    "listeners.client.bind",
                    client_app(
                        store=store,
                        routes=client_routes,
                        homeserver_check=homeserver_check,
                        cors=homeserver is not None,  # front mode: browsers' clients
                    ),
                    client_http,
                )
                metrics_url = None
                if listeners.metrics.enabled:
                    gauges = ScrapeGauges(subscriptions=services.subscriptions, store=store)
                    await outer.start(gauges.run)
                    metrics_url = await servers.start(
                        "listeners.metrics.bind",
                        MetricsOnly(gauges.refresh),
                        metrics_http,
                    )
                listening = Listening(client_url, federation_url, metrics_url)
                await store.record_server_name()
                log.info(
                    "peekproxy %s ready: server_name=%s key=%s client=%s federation=%s "
                    "key_server=%s/_matrix/key/v2/server metrics=%s front=%s fallback=%s",
                    __version__,
                    server.server_name,
                    key_id(signing_key),
                    client_url,
                    federation_url,
                    federation_url,
                    f"{metrics_url}/metrics" if metrics_url else "disabled",
                    _front_mode(config),
                    config.peeks.fallback,
                )
                sd_notify("READY=1")
                if reloader is not None:
                    reloader.ready = True
                started = True
                gc_thresholds = gc_policy.settle()
                outer.start_soon(gc_policy.collect_periodically)
                task_status.started(listening)
                await shutdown.wait()
                sd_notify("STOPPING=1")
                # Answers from now on close their HTTP/1.1 connections (hypercorn's own
                # shutdown, woken by the same event, may not have begun yet) ...
                for http in (federation_http, client_http, metrics_http):
                    http.closing = True
                # ... and every open long-poll answers now, and any that comes in meanwhile.
                services.notifier.drain()
            outer.cancel_scope.cancel()
    finally:
        if gc_thresholds is not None:
            gc_policy.restore(gc_thresholds)
        with trio.CancelScope(shield=True):
            if started:
                await _release_leases(services)
            if homeserver is not None:
                await homeserver.aclose()
            await federation.aclose()
            await store.aclose()
        if started:
            log.info("peekproxy stopped")

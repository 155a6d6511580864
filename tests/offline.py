"""The peek services (:class:`~peekproxy.services.Services`) driven in-process by a test,
whose federation client sends nothing (no signing key, no server made reachable): for tests
of the device side, ingest and races."""

from __future__ import annotations

from collections.abc import Callable

import trio

from peekproxy.federation.client import FederationClient, build_ssl_context
from peekproxy.federation.discovery import DnspythonLookup
from peekproxy.federation.ip_policy import IpFilter
from peekproxy.federation.keyring import Keyring
from peekproxy.services.assembly import PeekSettings, Services, build_services
from peekproxy.services.settings import LiveSettings
from peekproxy.store import Storage

#: Small caps, no linger, a one-minute idle timeout.
OFFLINE_SETTINGS = PeekSettings(
    linger_ms=0,
    renewal_max_ms=1_800_000,
    live=LiveSettings(max_remote_peeks=10),
    idle_timeout_ms=60_000,
)


def offline_client() -> FederationClient:
    """A federation client that these tests never make send anything."""
    return FederationClient(
        server_name=None,
        signing_key=None,
        dns=DnspythonLookup(),
        ip_filter=IpFilter([]),
        ssl_context=build_ssl_context(),
    )


def offline_service(
    store: Storage,
    *,
    settings: PeekSettings = OFFLINE_SETTINGS,
    clock_ms: Callable[[], int] = lambda: int(trio.current_time() * 1000),
) -> Services:
    """The services over ``store`` with :func:`offline_client` (ms clock: trio's, by default)."""
    client = offline_client()
    return build_services(
        store=store, client=client, keyring=Keyring(client), settings=settings, clock_ms=clock_ms
    )

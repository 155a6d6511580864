"""The testbed: a small federation server that hosts rooms and serves MSC2444 peeks.

It signs its own events (room versions 10, 11, 12), answers the R3 peek endpoints the way
``shared/reference/protocol.md`` specifies (plus the R4 renew endpoint), pushes every new
event to each active peeker with signed ``/send`` transactions, and serves the read
endpoints MSC2444 R4 opens for world_readable rooms. An admin API on a separate loopback
listener (bearer token) creates rooms, sends events, lists and expires peeks, and injects
faults. Run it with ``peekproxy testbed`` or :func:`run_testbed`.

This module assembles the testbed: the data directory's key and token
(:mod:`~peekproxy.testbed.files`), the federation client and keyring, the
:class:`~peekproxy.testbed.host.Testbed` (its state and behaviour), and the two listeners
(:mod:`~peekproxy.testbed.federation_api`, :mod:`~peekproxy.testbed.admin_api`) started with
:mod:`peekproxy.serving`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from peekproxy.federation.client import FederationClient
from peekproxy.federation.keyring import Keyring, TrustedNotary
from peekproxy.federation.signing_key import key_id
from peekproxy.serving import hypercorn_config, open_listeners
from peekproxy.testbed.admin_api import admin_app
from peekproxy.testbed.config import TestbedConfig
from peekproxy.testbed.federation_api import federation_app
from peekproxy.testbed.files import load_or_create_key, load_or_create_token
from peekproxy.testbed.host import Testbed

__all__ = ["Testbed", "TestbedListening", "run_testbed"]

log = logging.getLogger("peekproxy.testbed")


@dataclass(frozen=True)
class TestbedListening:
    """Base URLs of the testbed's listeners and its admin token."""

    __test__ = False  # not a pytest test class

    federation: str
    admin: str
    admin_token: str
    server_name: str


async def run_testbed(
    config: TestbedConfig,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[tuple[TestbedListening, Testbed]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the testbed until ``shutdown`` is set.

    ``task_status.started((TestbedListening(...), testbed))`` once both listeners are bound,
    so an in-process test can also drive the :class:`Testbed` object directly.

    Raises:
        ServingError: the data directory cannot be used (a damaged signing key, admin token
            or room file, or rooms of another server name; the message names the file), or
            a listener cannot bind.
    """
    if shutdown is None:
        shutdown = trio.Event()
    signing_key = load_or_create_key(config.server.key_file)
    token = load_or_create_token(config.token_file)
    client = FederationClient.from_config(
        config.federation, server_name=config.server.server_name, signing_key=signing_key
    )
    keyring = Keyring(
        client,
        None,
        [
            TrustedNotary(n.server_name, n.verify_keys)
            for n in config.federation.trusted_key_servers
        ],
    )
    testbed = Testbed(config, signing_key, client, keyring)
    try:
        loaded = await trio.to_thread.run_sync(testbed.load_rooms)
        async with trio.open_nursery() as nursery:
            testbed.nursery = nursery
            for sender in testbed.senders.values():
                nursery.start_soon(sender.run)
            listeners = config.listeners
            async with open_listeners(shutdown) as servers:
                federation_url = await servers.start(
                    "listeners.federation.bind",
                    federation_app(testbed),
                    hypercorn_config(
                        listeners.federation.bind,
                        grace=1.0,
                        access_log=config.logging.access_log,
                        certfile=listeners.federation.tls_certificate_file,
                        keyfile=listeners.federation.tls_private_key_file,
                    ),
                )
                admin_url = await servers.start(
                    "listeners.admin.bind",
                    admin_app(testbed, token),
                    hypercorn_config(listeners.admin.bind, grace=1.0, access_log=False),
                )
                listening = TestbedListening(
                    federation_url, admin_url, token, config.server.server_name
                )
                log.info(
                    "testbed ready: server_name=%s key=%s federation=%s admin=%s "
                    "token_file=%s rooms=%d",
                    config.server.server_name,
                    key_id(signing_key),
                    federation_url,
                    admin_url,
                    config.token_file,
                    loaded,
                )
                task_status.started((listening, testbed))
                await shutdown.wait()
                # The listeners drain (1 s grace), the senders get 2 s in all.
                nursery.cancel_scope.deadline = trio.current_time() + 2
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()

"""The I/O services: one concern each, over the store, the federation client and the core.

* :mod:`~peekproxy.services.subscriptions`: remote subscriptions (a task per followed room),
  followed through the :class:`~peekproxy.services.following.RoomFollower` seam, whose one
  implementation today is the MSC2444 peek (:mod:`~peekproxy.services.msc2444`);
* :mod:`~peekproxy.services.directory`: room IDs and aliases resolved over federation;
* :mod:`~peekproxy.services.ingest`: inbound ``/send`` transactions and typing expiry;
* :mod:`~peekproxy.services.syncing`: device peeks, ``/sync`` long-polls, the idle reaper;
* :mod:`~peekproxy.services.missing_events`: signer keys and ``get_missing_events``;
* :mod:`~peekproxy.services.backfill`: ``/backfill`` (a new peek's first view, gap fills);
* :mod:`~peekproxy.services.reads`: history reads (``/messages`` with remote backfill,
  ``/state``, ``/event``);
* :mod:`~peekproxy.services.notifier`: wake-ups of waiting syncs;
* :mod:`~peekproxy.services.errors`: :class:`PeekError`, turned into Matrix errors by the API.

:func:`build_services` assembles them into one :class:`Services` record, which the daemon
runs (:meth:`Services.run`) and the API calls.

May import: ``peekproxy.core``, ``peekproxy.store``, ``peekproxy.federation``,
``peekproxy.metrics`` and each other (no cycles: subscriptions ← ingest, syncing;
directory ← syncing). Must not import: ``peekproxy.api``, ``peekproxy.daemon``, HTTP servers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

from peekproxy.federation.client import FederationClient
from peekproxy.federation.keyring import Keyring
from peekproxy.services.directory import RoomDirectory
from peekproxy.services.errors import PeekError
from peekproxy.services.following import RoomFollower
from peekproxy.services.ingest import Ingest
from peekproxy.services.missing_events import MissingEvents
from peekproxy.services.msc2444 import Msc2444Peeks
from peekproxy.services.notifier import Notifier
from peekproxy.services.reads import HistoryReads
from peekproxy.services.settings import PeekSettings, now_ms
from peekproxy.services.subscriptions import Subscriptions
from peekproxy.services.syncing import Syncing
from peekproxy.store import Storage

__all__ = ["PeekError", "PeekSettings", "Services", "build_services"]


@dataclass(frozen=True)
class Services:
    """The peek services of one daemon, assembled by :func:`build_services`, and what they
    share (the store, the federation client and keyring, the settings and the clock)."""

    store: Storage
    client: FederationClient
    keyring: Keyring
    settings: PeekSettings
    clock_ms: Callable[[], int]
    notifier: Notifier
    follower: RoomFollower
    directory: RoomDirectory
    subscriptions: Subscriptions
    ingest: Ingest
    syncing: Syncing
    reads: HistoryReads

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the live window at the newest stream row, end the typing left from before
        a restart, resume the subscriptions (renew at once; a lapse while down becomes a
        gap) and restart the devices' idle clocks; then run the subscription tasks, typing
        expiry and the idle reaper until cancelled. ``task_status.started()`` once all of
        that is under way."""
        async with trio.open_nursery() as nursery:
            await self.syncing.open_live_window()
            await nursery.start(self.ingest.run)
            await nursery.start(self.subscriptions.run)
            await nursery.start(self.syncing.run)
            task_status.started()


def build_services(
    *,
    store: Storage,
    client: FederationClient,
    keyring: Keyring,
    settings: PeekSettings,
    clock_ms: Callable[[], int] = now_ms,
    follower: RoomFollower | None = None,
) -> Services:
    """The peek services over ``store``, sending through ``client`` (keys from ``keyring``).
    ``follower``: how remote rooms are followed (default: MSC2444 peeks)."""
    notifier = Notifier()
    missing = MissingEvents(store=store, client=client, keyring=keyring)
    if follower is None:
        follower = Msc2444Peeks(
            store=store, client=client, keyring=keyring, missing=missing, clock_ms=clock_ms
        )
    directory = RoomDirectory(client=client)
    subscriptions = Subscriptions(
        store=store,
        follower=follower,
        notifier=notifier,
        settings=settings,
        clock_ms=clock_ms,
    )
    ingest = Ingest(
        store=store,
        client=client,
        keyring=keyring,
        missing=missing,
        subscriptions=subscriptions,
        notifier=notifier,
        clock_ms=clock_ms,
    )
    syncing = Syncing(
        store=store,
        directory=directory,
        subscriptions=subscriptions,
        notifier=notifier,
        settings=settings,
        clock_ms=clock_ms,
    )

    def server_of(room_id: str) -> str | None:
        sub = subscriptions.get(room_id)
        return sub.server if sub is not None else None

    reads = HistoryReads(
        store=store, client=client, keyring=keyring, server_of=server_of, clock_ms=clock_ms
    )
    return Services(
        store=store,
        client=client,
        keyring=keyring,
        settings=settings,
        clock_ms=clock_ms,
        notifier=notifier,
        follower=follower,
        directory=directory,
        subscriptions=subscriptions,
        ingest=ingest,
        syncing=syncing,
        reads=reads,
    )
